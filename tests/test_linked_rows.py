"""Cross-image links between the rows of one denoiser call (`RowLayout.linked`): uncond reads uncond, cond
reads cond, on every call protocol (batched CFG, separate cond / uncond calls, no CFG, perturbed copies)."""

from attnctl.denoiser_call import RowLayout


def to_base(prompt: int) -> int:
    return 0


def test_batched_cfg_links_within_each_branch():
    rows = RowLayout.batched_cfg(3)  # uncond 0,1,2 then cond 0,1,2
    assert rows.linked(to_base) == (None, 0, 0, None, 3, 3)


def test_separate_calls_and_no_cfg_link_inside_the_call():
    assert RowLayout.single("cond", 3).linked(to_base) == (None, 0, 0)
    assert RowLayout.single("uncond", 2).linked(to_base) == (None, 0)


def test_perturbed_copies_read_the_copy_with_their_tag():
    rows, _ = RowLayout.batched_cfg(2).with_perturbed(("pag",))  # u0 u1 c0 c1 pag0 pag1
    assert rows.linked(to_base) == (None, 0, None, 2, None, 4)


def test_missing_source_or_no_link_gives_none():
    rows = RowLayout.batched_cfg(2)
    assert rows.linked(lambda prompt: None) == (None,) * 4
    assert rows.linked(lambda prompt: 5) == (None,) * 4
    assert rows.linked(lambda prompt: 1 - prompt) == (1, 0, 3, 2)
