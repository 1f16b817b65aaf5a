"""Is augmentation worth it? `python -m benchmarks.views`: the demo's digits through its backbone
(resnet18, random init, 64 px), a logreg head on the centre crops only, then with K = 1, 4 and 10
augmented views of each train image (`--views K`, `head --views`), each scored on the same test
rows, with the extraction time of the views and a paired McNemar test against the centre-crop head.

Writes benchmarks/out/views.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

OUT = Path("benchmarks/out")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 10])
    parser.add_argument("--head", default="logreg")
    args = parser.parse_args()
    from pipeline.config import FeaturesConfig, HeadConfig
    from pipeline.evaluate import compare
    from pipeline.features import stage
    from pipeline.heads import protocol
    from pipeline.settings import load_table

    demo = load_table(Path("configs/demo.toml"), "features")
    base = FeaturesConfig(**{**demo, "out": str(OUT / "views-digits.h5"), "progress": False})
    start = time.perf_counter()
    stage.run(base)
    rows = [{"views": 0, "extract_seconds": time.perf_counter() - start}]
    runs = {}
    for k in [0, *args.views]:
        cache = OUT / f"views-digits-k{k}.h5"
        if k:
            shutil.copy(base.out_path, cache)  # the same centre-crop cache; the views go beside it
            start = time.perf_counter()
            done = stage.run(dataclasses.replace(base, out=str(cache), views=k))
            rows.append(
                {
                    "views": k,
                    "extract_seconds": time.perf_counter() - start,
                    "view_rows": done.computed,
                }
            )
        head = HeadConfig(
            features=str(cache if k else base.out_path),
            head=args.head,
            views=bool(k),
            bootstrap=0,
            out=str(OUT / f"views-{args.head}-k{k}"),
            progress=False,
        )
        result = protocol.run(head)
        row = next(r for r in rows if r["views"] == k)
        row.update(top1=result["test"]["top1"], chosen=result["chosen"]["value"])
        runs[k] = compare.load_run(Path(head.out))
    for row in rows[1:]:
        paired = compare.pair(runs[row["views"]], runs[0], 0.05)
        row["vs_centre_crop"] = paired["statement"]
    print(
        f"{'views':>5}  {'test top-1':>10}  {'C':>8}  {'extraction s':>12}  paired vs centre crop"
    )
    for row in rows:
        print(
            f"{row['views']:>5}  {row['top1']:>10.4f}  {row['chosen']:>8.3g}  "
            f"{row['extract_seconds']:>12.1f}  "
            f"{row.get('vs_centre_crop', '')}"
        )
    (OUT / "views.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
