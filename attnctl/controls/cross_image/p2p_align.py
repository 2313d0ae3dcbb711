"""Prompt-to-Prompt's token alignment (Hertz et al. 2022, arXiv:2208.01626, §3.2 and its `seq_aligner.py`).

An edited prompt's text tokens are aligned to the base prompt's by a global (Needleman-Wunsch) alignment with
P2P's scores (gap 0, match 1, mismatch -1) and its trace-back preferences, over the tokens with the special tokens
(BOS / EOS) included. The padding after the edited prompt's last token reads the base position it stands at (refine,
as P2P's `get_mapper`); replace aligns it by its offset from the last aligned token.

- `refinement_mapper`: for each edited token, the base token it aligns to (or -1) and alpha = 1 where aligned
  (P2P's `get_refinement_mapper`: aligned tokens take the base maps, new tokens keep their own).
- `replacement_mapper`: a (T, T) matrix `M` with `A_edit = A_base M` (P2P's `get_replacement_mapper`): with the
  same number of words on both sides (word indices known), word for word as P2P; otherwise aligned
  tokens map one to one; each run of swapped tokens between two aligned ones is split into word pairs when both
  sides of the run hold the same number of words (P2P swaps word for word), and each word pair (or the whole run
  otherwise) maps one to one when its token counts are equal, else every base token to every edited token with
  weight 1 / (edited tokens), as P2P's `get_replacement_mapper_`. A run present in one prompt only (a word added or
  removed) is not a swap: ConfigError (use refine).
"""

from __future__ import annotations

from collections.abc import Sequence

from ...errors import ConfigError

GAP, MATCH, MISMATCH = 0, 1, -1


def align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """For each token of `y`, the index of the token of `x` it is aligned to, or -1 (P2P's `global_align` and
    `get_aligned_sequences`: ties prefer a gap in x, then a gap in y, then the diagonal)."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(1, m + 1):
        score[0][j], trace[0][j] = GAP * j, 1
    for i in range(1, n + 1):
        score[i][0], trace[i][0] = GAP * i, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i][j - 1] + GAP
            up = score[i - 1][j] + GAP
            diag = score[i - 1][j - 1] + (MATCH if x[i - 1] == y[j - 1] else MISMATCH)
            best = max(left, up, diag)
            score[i][j] = best
            trace[i][j] = 1 if best == left else 2 if best == up else 3
    mapping = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = trace[i][j]
        if step == 3:
            i, j = i - 1, j - 1
            mapping[j] = i
        elif step == 1:
            j -= 1
        else:
            i -= 1
    return mapping


def refinement_mapper(x: Sequence[int], y: Sequence[int], limit: int, *, masked_padding: bool = False) -> tuple[list[int], list[float]]:
    """(base index or -1, alpha) for each of the `limit` positions of the edited prompt `y` (token ids, special
    tokens included, truncated to `limit`). The positions after the edited prompt's last token read the base's same
    position (P2P's `get_mapper`: `mapper[len(y):] = arange(len(y), limit)`, alpha 1), where the base may still hold
    real tokens when the edit is the shorter. `masked_padding`: the model masks the text after each prompt's last
    token (Qwen-Image), so those positions of the edited row are no keys of it: -1 there (its own, masked, map)."""
    x, y = list(x)[:limit], list(y)[:limit]
    mapping = align(x, y) + ([-1] * (limit - len(y)) if masked_padding else list(range(len(y), limit)))
    return mapping, [0.0 if m < 0 else 1.0 for m in mapping]


def _swap(matrix: list[list[float]], source: list[int], target: list[int]) -> None:
    """P2P's rule for one swapped word: one to one for equal token counts, else all to all at 1 / len(target)."""
    if len(source) == len(target):
        for s, t in zip(source, target):
            matrix[s][t] = 1.0
        return
    for s in source:
        for t in target:
            matrix[s][t] = 1.0 / len(target)


def _words(positions: list[int], word_of: Sequence[int] | None) -> list[list[int]] | None:
    """`positions` grouped into consecutive words by `word_of` (a word index per token, -1 for none), or None."""
    if word_of is None or any(word_of[p] < 0 for p in positions):
        return None
    groups: list[list[int]] = []
    for p in positions:
        if groups and word_of[groups[-1][-1]] == word_of[p]:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def _word_for_word(x: list[int], y: list[int], limit: int, x_words: Sequence[int] | None,
                   y_words: Sequence[int] | None) -> list[list[float]] | None:
    """P2P's own replace map when both prompts have the same words count: word i of the base to word i of the edit
    (equal words one to one; a swapped word by `_swap`), special tokens in order, padding by offset. None where the
    word indices are not known or the prompts differ in word count or special tokens (the alignment decides then): a
    token-level alignment can pair a whole word with the last piece of a longer word ("on" in "crims|on")."""
    if x_words is None or y_words is None:
        return None

    def groups(tokens: list[int], words: Sequence[int]) -> tuple[list[list[int]], list[int]]:
        """The token positions of each word, in order, and those of the special tokens."""
        by_word: dict[int, list[int]] = {}
        special = []
        for position in range(len(tokens)):
            word = words[position] if position < len(words) else -1
            if word < 0:
                special.append(position)
            else:
                by_word.setdefault(word, []).append(position)
        return [by_word[w] for w in sorted(by_word)], special

    (x_groups, x_special), (y_groups, y_special) = groups(x, x_words), groups(y, y_words)
    if len(x_groups) != len(y_groups) or [x[i] for i in x_special] != [y[j] for j in y_special]:
        return None
    matrix = [[0.0] * limit for _ in range(limit)]
    for i, j in zip(x_special, y_special):
        matrix[i][j] = 1.0
    for source, target in zip(x_groups, y_groups):
        _swap(matrix, source, target)  # equal words: one to one, as their tokens are equal
    for offset, j in enumerate(range(len(y), limit)):
        i = len(x) + offset
        if i < limit:
            matrix[i][j] = 1.0
    return matrix


def replacement_mapper(x: Sequence[int], y: Sequence[int], limit: int, *, what: str = "the edited prompt",
                       x_words: Sequence[int] | None = None, y_words: Sequence[int] | None = None) -> list[list[float]]:
    """The (limit, limit) word-swap matrix M (base position, edited position) with `A_edit = A_base M`. `x_words`,
    `y_words`: the word index of each token of `x` / `y` (-1 for special tokens), when the tokenizer gives
    character offsets; without them a swapped run counts as one word."""
    x, y = list(x)[:limit], list(y)[:limit]
    matrix = _word_for_word(x, y, limit, x_words, y_words)
    if matrix is not None:
        return matrix
    mapping = align(x, y)
    matrix = [[0.0] * limit for _ in range(limit)]
    anchors = [(-1, -1)] + [(mapping[j], j) for j in range(len(y)) if mapping[j] >= 0] + [(len(x), len(y))]
    for (xa, ya), (xb, yb) in zip(anchors, anchors[1:]):
        if ya >= 0:
            matrix[xa][ya] = 1.0
        source, target = list(range(xa + 1, xb)), list(range(ya + 1, yb))
        if bool(source) != bool(target):
            kind = "adds" if target else "removes"
            raise ConfigError(
                f"PromptToPrompt(mode='replace'): {what} {kind} tokens relative to the base prompt (tokens "
                f"{target or source}); replace swaps words one for one (token counts may differ). Use mode='refine' "
                "to add or remove words"
            )
        if not source:
            continue
        source_words, target_words = _words(source, x_words), _words(target, y_words)
        if source_words is not None and target_words is not None and len(source_words) == len(target_words):
            for source_word, target_word in zip(source_words, target_words):
                _swap(matrix, source_word, target_word)
        else:
            _swap(matrix, source, target)
    for offset, j in enumerate(range(len(y), limit)):
        i = len(x) + offset
        if i < limit:
            matrix[i][j] = 1.0
    return matrix
