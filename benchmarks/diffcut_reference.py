"""DiffCut side by side with its reference implementation: agreement and speed of the cheap step, same process.

    git clone https://github.com/PaulCouairon/DiffCut /tmp/diffcut-reference
    python benchmarks/diffcut_reference.py --reference /tmp/diffcut-reference [--cases 6] [--side 32] [--channels 1280]

Nothing of the reference is shipped here: its `diffcut/recursive_normalized_cut.py` (and the `tools.utils` it
imports) is loaded from the folder given, with its hard-coded "cuda" device replaced by this run's `--device`.
Each case is a (side², C) token map (a smooth random field plus noise; C = 1280 is SSD-1B's layer), segmented
at 128×128 by the reference's `DiffCut.generate_masks` and by
`segment_features` with the same τ and α. The table gives the share of pixels with the same id (the reference's ids
made contiguous), the matched agreement (ids paired one-to-one), both times and the speed-up, and the time our run
spends in LAPACK's eigensolves (`eigh_s`): the reference's own solver on the same matrices, which the same cuts need,
so `ceiling` = reference_s / eigh_s bounds the speed-up any exact implementation can reach on this machine. Cases
where the reference recurses without end are reported, not scored; cases where the reference's float32 cluster sums
are no longer exact (many accepted cuts) are marked: there the two differ on purpose.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from common import arguments, report, timeit
from diffseg import segment_features
from diffseg.evaluation.metrics import hungarian_scores
from diffseg.methods.diffcut.ncut import recursive_ncut


def load_reference(folder: Path, device: str):
    """The reference's `DiffCut` class, from its own files, on `device`."""
    source = folder / "diffcut" / "recursive_normalized_cut.py"
    if not source.is_file():
        sys.exit(f"{source} not found: --reference must be a checkout of PaulCouairon/DiffCut")
    sys.path.insert(0, str(folder))  # its `from tools.utils import MaskPooling`
    if "tools" not in sys.modules:  # a namespace package, should the checkout lack tools/__init__.py
        package = types.ModuleType("tools")
        package.__path__ = [str(folder / "tools")]
        sys.modules["tools"] = package
    spec = importlib.util.spec_from_file_location("tools.utils", folder / "tools" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    sys.modules["tools.utils"] = utils
    module = types.ModuleType("reference_diffcut")
    code = source.read_text().replace('"cuda"', repr(device))
    exec(compile(code, str(source), "exec"), module.__dict__)
    return module.DiffCut


def token_map(seed: int, side: int, channels: int, low: int, noise: float) -> torch.Tensor:
    """(side², C) tokens: a smooth random field (a low×low grid of random C-vectors, bilinearly upsampled) plus
    noise, which gives a few dozen cuts at τ = 0.5 as real UNet features do."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.randn(1, channels, low, low, generator=generator)
    field = torch.nn.functional.interpolate(field, size=(side, side), mode="bilinear", align_corners=False)
    tokens = field[0].permute(1, 2, 0).reshape(side * side, channels)
    return tokens + noise * tokens.std() * torch.randn(tokens.shape, generator=generator)


def exact_in_float32(masks: list[torch.Tensor]) -> bool:
    """Whether the reference's float32 `max_value` sums over these masks equal the exact integer sums."""
    exact, approx = [0] * len(masks[0]) if masks else [], torch.zeros(len(masks[0]) if masks else 0)
    top, top32 = 1, torch.tensor(1.0)
    for mask in masks:
        bits = mask.tolist()
        exact = [v + top * b for v, b in zip(exact, bits)]
        approx = approx + top32 * mask.float()
        top, top32 = max(exact) + 1, approx.max() + 1
    return all(float(a) == e for a, e in zip(approx.tolist(), exact))


def eigensolve_seconds(fn) -> float:
    """Seconds that one call of `fn` spends in `torch.linalg.eigh`."""
    spent, solve = [], torch.linalg.eigh

    def timed(matrix):
        start = time.perf_counter()
        result = solve(matrix)
        spent.append(time.perf_counter() - start)
        return result

    torch.linalg.eigh = timed
    try:
        fn()
    finally:
        torch.linalg.eigh = solve
    return sum(spent)


def main() -> None:
    parser = arguments(__doc__, repeat=3)
    parser.add_argument("--reference", required=True, help="a checkout of PaulCouairon/DiffCut")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--side", type=int, default=32, help="token grid side (the reference's: 1024 / 32)")
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=10)
    args = parser.parse_args()
    ReferenceDiffCut = load_reference(Path(args.reference).resolve(), args.device)
    sys.setrecursionlimit(10_000)

    rows = []
    for k in range(args.cases):
        low, noise = 3 + k % 2, (0.1, 0.2, 0.3)[k % 3]
        features = token_map(k, args.side, args.channels, low, noise).to(args.device)
        size = (128, 128)
        tokens = torch.nn.functional.normalize(features.T, dim=0)
        masks = recursive_ncut(tokens, tau=args.tau, alpha=args.alpha)
        cuts = len(masks)

        def reference():
            # `generate_masks` reads the token grid side from `img_size // 32`.
            return ReferenceDiffCut().generate_masks(
                features[None], args.tau, mask_size=size, alpha=args.alpha, img_size=args.side * 32
            )[0, 0]

        def ours():
            return segment_features(features, tau=args.tau, alpha=args.alpha, output_size=size)

        row = {"case": k, "noise": noise, "cuts": cuts, "exact sums": "yes" if exact_in_float32(masks) else "no"}
        try:
            theirs = reference()
        except RecursionError:
            rows.append({**row, "agreement": "reference recursion"})
            continue
        mine = ours()
        eigh_s = eigensolve_seconds(ours)
        contiguous = np.unique(theirs, return_inverse=True)[1].reshape(theirs.shape)
        n = int(max(mine.max(), contiguous.max())) + 1
        matched = float(hungarian_scores(contiguous, mine, n).tp.sum() / mine.size)
        t_ref = timeit(reference, repeat=args.repeat)["median_s"]
        t_ours = timeit(ours, repeat=args.repeat)["median_s"]
        rows.append(
            {
                **row,
                "segments": f"{mine.max() + 1} / {contiguous.max() + 1}",
                "agreement": float((mine == contiguous).mean()),
                "matched": matched,
                "reference_s": t_ref,
                "ours_s": t_ours,
                "speed-up": t_ref / t_ours,
                "eigh_s": eigh_s,
                "ceiling": t_ref / eigh_s,
            }
        )
    columns = [
        "case",
        "noise",
        "cuts",
        "exact sums",
        "segments",
        "agreement",
        "matched",
        "reference_s",
        "ours_s",
        "speed-up",
        "eigh_s",
        "ceiling",
    ]
    report("diffcut_reference", rows, columns, {"settings": vars(args)})


if __name__ == "__main__":
    main()
