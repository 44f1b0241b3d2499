"""What the GPU check runs on (scripts/gpu_check.sh, step 2): the GPU, the versions that matter, and every carried
wheel — where it was imported from, and which of its requirements this machine does not meet (pip --no-deps checked
none). A note, not a failure: the suite then shows what breaks. Exit status 1 only if torch itself does not import."""

import importlib.metadata as metadata
import os
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "pyarrow", "fsspec",
            "huggingface-hub", "pytest-timeout", "flash-attn", "deepspeed")  # fmt: skip


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def carried_distributions() -> list[str]:
    """Distribution names of the wheels gpu_check.sh installed (a wheel's file name starts NAME-VERSION-)."""
    wheels = os.environ.get("NANODPO_GPU_CHECK_CARRIED", "").split()
    return [Path(wheel).name.split("-")[0] for wheel in wheels]


def unmet_requirements(name: str) -> list[str]:
    from packaging.requirements import Requirement

    unmet = []
    for text in metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        found = version(requirement.name)
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            unmet.append(f"{requirement} (found {found or 'nothing'})")
    return unmet


def main() -> int:
    try:
        import torch
    except ImportError as err:
        print(f"preflight: torch does not import: {err}")
        return 1
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"python {sys.version.split()[0]} ({sys.executable}); torch CUDA {torch.version.cuda}; "
          f"GPUs: {', '.join(gpus) if gpus else 'none (every GPU test will skip)'}")  # fmt: skip
    if gpus:
        free, total = torch.cuda.mem_get_info()
        print(f"GPU 0 memory: {free / 2**30:.0f} GiB free of {total / 2**30:.0f} GiB")
    print("versions: " + ", ".join(f"{name} {version(name) or '-'}" for name in PACKAGES))
    for name in carried_distributions():
        dist = metadata.distribution(name)
        print(f"carried: {name} {dist.version} from {dist.locate_file('')}")
        for unmet in unmet_requirements(name):
            print(f"  note: {name} requires {unmet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
