"""docs/architecture.md stays true to the code: every file it names exists, every `file.py` `Name` pair names
something defined in that file, and every config key it names is in the schema."""
import re
from pathlib import Path

from coreseg.common.config import load_config, get_value

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def test_every_named_file_exists():
    paths = set(re.findall(r"`((?:[\w.]+/)+[\w.]+\.(?:py|yaml|md))`", DOC))
    assert len(paths) > 15
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_every_named_symbol_is_defined_where_the_doc_says():
    pairs = re.findall(r"`((?:[\w]+/)+\w+\.py)` `(\w+)(?:\.(\w+))?", DOC)
    assert len(pairs) > 8
    for path, name, attr in pairs:
        source = (ROOT / path).read_text()
        assert re.search(rf"^\s*(class|def) {name}\b|^{name} =", source, re.M), f"{name} not defined in {path}"
        if attr:
            assert re.search(rf"def {attr}\b", source), f"{name}.{attr} not defined in {path}"


def test_every_named_config_key_exists():
    cfg = load_config("tiny_cpu")
    keys = set(re.findall(r"`((?:model|data|rollout|reward|learner|cluster|run)\.[a-z_]+)", DOC))
    assert len(keys) > 10
    for key in keys:
        get_value(cfg, key)  # AttributeError names a key the schema does not have
