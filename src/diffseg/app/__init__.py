"""The interactive demo (Gradio): the page and its handlers (`demo`), the viewer's data (`view`), static files (`web/`)
and the shipped example images (`examples/`)."""
