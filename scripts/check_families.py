"""Run offspec's family check on every causal-LM model type the installed transformers ships.

Each model type is taken from transformers' auto mapping with its default config (completed where the default does
not build, models/tiny.py): refused by its structure (experts offspec does not stream by expert,
encoder-decoder, recurrent layers, a layer stack offspec does not stream, ...) or checked by the contract check
(runtime/family_check.py), timed.
Prints one line per model type and the counts; --json writes the records; --write-shipped records the contract
verdicts as the ones shipped for this transformers version (offspec/data/families.json), for a version the test
suite passed on.

    python scripts/check_families.py --json families.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--write-shipped", action="store_true",
                        help="record the verdicts in offspec/data/families.json")
    parser.add_argument("model_types", nargs="*", help="only these (default: every causal-LM model type)")
    args = parser.parse_args()

    from offspec.console import quiet_libraries

    quiet_libraries()
    import torch

    torch.set_num_threads(1)
    from offspec.console import quiet_transformers
    from offspec.errors import ModelError
    from offspec.models.registry import check_supported
    from offspec.models.tiny import default_config
    from offspec.runtime.family_check import SHIPPED, check_family
    from offspec.transformers_contract import causal_lm_mapping, transformers_version

    version = transformers_version()
    records = []
    with quiet_transformers():
        for model_type in args.model_types or sorted(causal_lm_mapping()):
            t0 = time.perf_counter()
            try:
                config = default_config(model_type)
                check_supported(config)
            except ModelError as exc:
                records.append({"model_type": model_type, "status": "refused", "part": "structure",
                                "why": str(exc).split(": ", 1)[-1], "seconds": time.perf_counter() - t0})
            except Exception as exc:  # noqa: BLE001 - transformers' own default config does not load
                records.append({"model_type": model_type, "status": "refused", "part": "config",
                                "why": f"transformers' default config does not load ({type(exc).__name__})",
                                "seconds": time.perf_counter() - t0})
            else:
                v = check_family(config)
                records.append({"model_type": model_type, "status": "runs" if v.ok else "refused",
                                "part": v.part or "", "why": v.detail, "seconds": v.seconds})
            r = records[-1]
            print(f"{r['model_type']:28s} {r['status']:8s} {r['seconds']:6.2f} s  {r['part']}{': ' if r['why'] else ''}"
                  f"{r['why']}", flush=True)
    checked = [r for r in records if r["part"] not in ("structure", "config")]
    runs = [r for r in checked if r["status"] == "runs"]
    times = sorted(r["seconds"] for r in checked)
    summary = {"transformers": version, "model_types": len(records), "dense_decoder_only": len(checked),
               "runs": len(runs), "check_s_median": times[len(times) // 2] if times else None,
               "check_s_max": times[-1] if times else None}
    print(f"transformers {version}: {len(runs)} of {len(checked)} decoder-only families run "
          f"({len(records)} causal-LM model types; contract check median {summary['check_s_median']:.2f} s, "
          f"max {summary['check_s_max']:.2f} s)")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    if args.write_shipped:
        data = json.loads(SHIPPED.read_text()) if SHIPPED.is_file() else {}
        data[version] = {"ok": sorted(r["model_type"] for r in runs),
                         "refused": {r["model_type"]: f"{r['part']}: {r['why']}" for r in checked
                                     if r["status"] != "runs"}}
        SHIPPED.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {SHIPPED}")


if __name__ == "__main__":
    main()
