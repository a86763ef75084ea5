"""How much of a unit's shared head a partial hit may reuse. Stdlib only: the
engine and the linter's simulation call the same function, so the linter predicts
what the server does.

A *partial hit*: the unit walk (digests) stops at a unit whose digest no cached
node has, but a cached sibling (same parent: the same KV before it) starts with
the same tokens, e.g. a system message whose shared head is followed by another
agent's text. The head's KV is then reused and only the rest is computed.

The reused KV must be the same bits as a cold prefill of the unit, so the rest
must be computed in the same calls a cold prefill would make. A cold prefill runs
a unit in chunks of ``chunk`` tokens counted from the unit's start; the cached
sibling was computed the same way from the same start. Hence:

- where the model plan computes every row of a 2..``independent_rows``-token call
  independently of the call's other rows (``ExecPlan.independent_rows``), only the
  1-token calls (they take the decode step, other arithmetic) must fall on the
  same tokens: the reuse is the common prefix, shortened so that the rest ends in
  a 1-token chunk exactly when the unit alone does, and never ending on a sibling
  token that the sibling computed in a 1-token chunk;
- otherwise (rows depend on the call's shape) the reuse is the common prefix
  rounded down to a multiple of ``chunk``: the rest then starts on a chunk
  boundary of the cold prefill and runs the very same calls.

So the chunk boundaries never depend on where an earlier request stopped. (A
sibling that holds a generated reply was decoded token by token; reusing its head
is the same approximation as reusing the reply itself, which the tree already does.)
"""

from __future__ import annotations

from collections.abc import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable_tokens(common: int, unit_len: int, node_len: int, chunk: int,
                    independent_rows: int) -> int:
    """Tokens of a unit of ``unit_len`` tokens that may be taken from a cached
    sibling of ``node_len`` tokens sharing its first ``common`` tokens (see the
    module docstring). Never the whole unit: a partial hit computes at least one
    token of it (a unit equal to the sibling token for token but under another
    digest reuses all but its last chunk)."""
    if chunk <= 0:  # one call for the whole unit: nothing is the same call but all of it
        return 0
    r = min(common, unit_len - 1, node_len)
    if r <= 0:
        return 0
    if not 2 <= chunk <= independent_rows:
        return r - r % chunk
    if r == node_len and node_len % chunk == 1:
        r -= 1  # the sibling's last token came from a 1-token call
    if unit_len % chunk == 1:  # the unit alone ends in a 1-token call: so must the rest
        return r - r % chunk
    if (unit_len - r) % chunk == 1:
        r -= 1
    return max(r, 0)
