"""Per-layer override resolution, shared by pruning targets and quantization bit-widths."""

from sparsebench.layers import resolve_overrides

NAMES = ["block1.conv", "block2.conv", "block3.conv", "fc"]


def test_exact_name_beats_regex_and_later_regex_beats_earlier():
    chosen, unmatched = resolve_overrides(NAMES, ["block2.conv", r"block.\.conv", r"block[23]\.conv"])
    assert chosen == {"block1.conv": r"block.\.conv", "block2.conv": "block2.conv", "block3.conv": r"block[23]\.conv"}
    assert unmatched == []


def test_regexes_match_whole_names_and_misses_are_reported_in_order():
    chosen, unmatched = resolve_overrides(NAMES, ["conv", "f", "nope", "fc"])
    assert chosen == {"fc": "fc"} and unmatched == ["conv", "f", "nope"]


def test_describe_counts_row_lengths_for_the_kernels_load_balance():
    import torch
    from torch import nn

    from sparsebench.layers import describe

    conv = nn.Conv2d(2, 3, 3, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = 1.0  # 18 nonzeros in row 0
        conv.weight[2, 1, 0] = 1.0  # 3 in row 2; row 1 is empty
    row = describe(nn.Sequential(conv), torch.zeros(1, 2, 5, 5))[0]
    assert (row["nnz"], row["row_nnz_max"], row["rows_empty"], row["params"]) == (21, 18, 1, 54)
    assert row["sparsity"] == round(33 / 54, 6)


def test_macs_per_weight_counts_every_position_and_call():
    import torch
    from torch import nn

    from sparsebench.layers import describe, macs_per_weight

    # 5x5 input, 3x3 kernel: 3x3 outputs; stride 2 with padding 1 on 3x3: 2x2; then a linear layer.
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16, 5))
    sample = torch.zeros(1, 2, 5, 5)
    assert macs_per_weight(model, sample) == {"0": 9, "1": 4, "3": 1}
    assert [r["macs_per_weight"] for r in describe(model, sample)] == [9, 4, 1]

    class Twice(nn.Module):  # one conv applied twice, a grouped conv, and a layer never called
        def __init__(self):
            super().__init__()
            self.conv, self.grouped, self.unused = (
                nn.Conv2d(4, 4, 3, padding=1),
                nn.Conv2d(4, 8, 1, groups=2),
                nn.Linear(2, 2),
            )

        def forward(self, x):
            return self.grouped(self.conv(self.conv(x)))

    assert macs_per_weight(Twice(), torch.zeros(1, 4, 6, 6)) == {"conv": 72, "grouped": 36}
    rows = describe(Twice(), torch.zeros(1, 4, 6, 6))
    assert [(r["in_shape"], r["macs_per_weight"]) for r in rows] == [("4x6x6", 72), ("4x6x6", 36), ("", 0)]
