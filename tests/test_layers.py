"""Per-layer override resolution, shared by pruning targets and quantization bit-widths."""

from sparsebench.layers import resolve_overrides

NAMES = ["block1.conv", "block2.conv", "block3.conv", "fc"]


def test_exact_name_beats_regex_and_later_regex_beats_earlier():
    chosen, unmatched = resolve_overrides(NAMES, ["block2.conv", r"block.\.conv", r"block[23]\.conv"])
    assert chosen == {"block1.conv": r"block.\.conv", "block2.conv": "block2.conv",
                      "block3.conv": r"block[23]\.conv"}
    assert unmatched == []


def test_regexes_match_whole_names_and_misses_are_reported_in_order():
    chosen, unmatched = resolve_overrides(NAMES, ["conv", "f", "nope", "fc"])
    assert chosen == {"fc": "fc"} and unmatched == ["conv", "f", "nope"]
