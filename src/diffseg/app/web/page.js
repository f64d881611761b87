() => {
  // Page-wide behaviour of the demo (Gradio's `launch(js=...)`), re-applied as Gradio renders.
  //
  // 1. The status line is announced to screen readers.
  // 2. The timestep re-encodes on keyboard changes too: Gradio's slider fires "release" (which re-encodes) on
  //    pointer-up and on leaving its number box only, so arrow keys (after a pause, so that holding a key encodes
  //    once) and Enter in the number box end the change the same way a mouse release does.
  // 3. Example thumbnails get their captions as visible text and as accessible names; the input image a name;
  //    download links the name of their file.
  // 4. Stop is shown only while an event runs.
  // 5. Keyboard: a slider is two Tab stops; on a phone a new result scrolls into view.
  const CAPTIONS = __CAPTIONS__; // filled in by app.py from the examples' file names
  const apply = () => {
    // Gradio's container hides its overflow, which makes it the scroller of the phone layout's sticky viewer
    // (web/app.css) and so un-sticks it; "clip" looks the same and does not.
    const container = document.querySelector(".gradio-container");
    if (container && container.style.overflow !== "clip") container.style.overflow = "clip";
    const status = document.getElementById("status");
    if (status && status.getAttribute("role") !== "status") {
      status.setAttribute("role", "status");
      status.setAttribute("aria-live", "polite");
    }
    const range = document.querySelector("#timestep input[type=range]");
    if (range && !range.dataset.diffsegKeys) {
      range.dataset.diffsegKeys = "1";
      let timer = null;
      range.addEventListener("keyup", (event) => {
        if (!/^(Arrow|Page|Home|End)/.test(event.key)) return;
        clearTimeout(timer);
        timer = setTimeout(() => range.dispatchEvent(new PointerEvent("pointerup", { bubbles: true })), 400);
      });
      const box = document.querySelector("#timestep input[type=number]");
      box.addEventListener("keydown", (event) => {
        if (event.key === "Enter") box.blur();
      });
    }
    document.querySelectorAll("#examples button").forEach((button, k) => {
      const caption = CAPTIONS[k];
      if (!caption) return;
      if (!button.querySelector(".caption")) {
        const text = document.createElement("span");
        text.className = "caption";
        text.textContent = caption;
        button.append(text);
        button.setAttribute("aria-label", `Example: ${caption}`);
      }
      button.querySelectorAll("img:not([alt]), img[alt='']").forEach((img) => img.setAttribute("alt", caption));
    });
    document.querySelectorAll("#input-image img:not([alt]), #input-image img[alt='']").forEach((img) => {
      img.setAttribute("alt", "The image to segment");
    });
    // Stop is shown while the viewer's progress display is (every event that runs shows it there).
    const running = !!document.querySelector("#viewer [data-testid=status-tracker]:not(.hide)");
    document.body.classList.toggle("diffseg-running", running);
    // Download links are named by what they download, not only by its size ("4.3 MB").
    document.querySelectorAll("#downloads a").forEach((link) => {
      const file = link.closest("tr")?.querySelector(".filename")?.getAttribute("aria-label");
      const name = file && `Download ${file} (${link.textContent.trim()})`;
      if (name && link.getAttribute("aria-label") !== name) link.setAttribute("aria-label", name);
    });
    // Two Tab stops per slider (its track and its box), not three: its "reset to default" button is left out (the
    // page's Reset button does that for every control).
    document.querySelectorAll("#main button[data-testid=reset-button]:not([tabindex])").forEach((button) => {
      button.setAttribute("tabindex", "-1");
    });
    // Gradio's icon-only buttons without a name of their own get their title as one.
    document.querySelectorAll("button:not([aria-label])").forEach((button) => {
      if (!button.textContent.trim() && button.title) button.setAttribute("aria-label", button.title);
    });
  };
  // On a phone the result comes after the upload: a new image's result is scrolled to the top of the screen.
  let shownViewer = null;
  let shownImage = null;
  const follow = () => {
    const viewer = document.querySelector("#viewer .diffseg-viewer");
    if (!viewer || viewer === shownViewer) return; // each result is a new element; a slider move keeps the image
    shownViewer = viewer;
    const image = viewer.dataset.image;
    if (image === shownImage) return;
    shownImage = image;
    if (window.matchMedia("(max-width: 640px)").matches) viewer.scrollIntoView({ block: "start" });
  };
  new MutationObserver(follow).observe(document.body, { childList: true, subtree: true });
  new MutationObserver(apply).observe(document.body, {
    childList: true,
    subtree: true,
    attributes: true,
    attributeFilter: ["class"],
  });
  apply();
}
