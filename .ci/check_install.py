"""Read a `pip install --dry-run --report` file and fail if the resolved install holds CUDA wheels.

Used by `make check-install`: on a CPU-only Linux machine the install must take PyTorch's CPU build, never
torch's CUDA build with its nvidia-* wheels."""

from __future__ import annotations

import json
import sys


def main(path: str) -> int:
    with open(path, encoding="utf-8") as handle:
        report = json.load(handle)
    packages = [(item["metadata"]["name"], item["metadata"]["version"]) for item in report.get("install", [])]
    cuda = [f"{name} {version}" for name, version in packages
            if name.lower().startswith(("nvidia-", "cuda-", "triton")) or "+cu" in version]
    torch = [f"{name} {version}" for name, version in packages if name.lower() == "torch"]
    print(f"resolved {len(packages)} package(s); torch: {', '.join(torch) or 'already installed / not resolved'}")
    if cuda:
        print("CUDA packages in the install (a CPU-only machine should not get these):\n  " + "\n  ".join(cuda))
        return 1
    print("no CUDA packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
