"""Make a CUDA-build torchvision importable beside CPU torch.

Why: PyPI's Linux torchvision wheels are CUDA builds; beside the CPU torch wheel their compiled ops do not
load, and `_meta_registrations.py` registers fake kernels for `torchvision::nms`/`qnms` unconditionally,
so `import torchvision` fails with "operator torchvision::nms does not exist". That also breaks
transformers' Qwen2.5-VL import, segment_anything and vLLM. Guarding the two registrations with
`torchvision.extension._has_ops()` (as the file already does for every other op) fixes the import; the
ops we use (image transforms) are pure Python. Run only when `import torchvision` fails.
"""
import importlib.util
import pathlib
import sys

GUARD = ("def _register_fake_if_ops(name):  # coreseg setup: guard for CPU torch + CUDA torchvision\n"
         "    return torch.library.register_fake(name) if torchvision.extension._has_ops() else (lambda fn: fn)\n\n\n")


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed", file=sys.stderr)
        return 1
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if "_register_fake_if_ops" in text:
        return 0
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")'
        if old not in text:
            print(f"unexpected torchvision layout: {old} not found in {path}", file=sys.stderr)
            return 1
        text = text.replace(old, f'@_register_fake_if_ops("torchvision::{op}")')
    anchor = "@register_meta(\"roi_align\")"
    text = text.replace(anchor, GUARD + anchor, 1)
    path.write_text(text)
    print(f"patched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
