"""The compiled (numba) kernels of DPDP (dpslm_stream/dpdp.py holds the algorithm's description and its API).

Offline and streaming use the same _select_nearest and _viterbi_step, so they round alike. The arrays are numpy
(float64 costs, int64 states and frames); nothing here knows torch.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _key_less(buf_v, buf_i, a, b):
    """Order of candidate codes: by distance, then by index (so ties at the n-th place keep the lowest indices)."""
    return buf_v[a] < buf_v[b] or (buf_v[a] == buf_v[b] and buf_i[a] < buf_i[b])


@numba.njit(cache=True)
def _swap(buf_v, buf_i, a, b):
    buf_v[a], buf_v[b] = buf_v[b], buf_v[a]
    buf_i[a], buf_i[b] = buf_i[b], buf_i[a]


@numba.njit(cache=True)
def _partial_select(buf_v, buf_i, count, n):
    """Reorders buf[:count] so that buf[:n] holds its n smallest keys (quickselect; keys are distinct)."""
    lo = 0
    hi = count - 1
    target = n - 1
    while lo < hi:
        # Median of three as pivot, moved to hi.
        mid = (lo + hi) // 2
        if _key_less(buf_v, buf_i, mid, lo):
            _swap(buf_v, buf_i, mid, lo)
        if _key_less(buf_v, buf_i, hi, lo):
            _swap(buf_v, buf_i, hi, lo)
        if _key_less(buf_v, buf_i, mid, hi):
            _swap(buf_v, buf_i, mid, hi)
        # Lomuto partition around the pivot at hi.
        store = lo
        for j in range(lo, hi):
            if _key_less(buf_v, buf_i, j, hi):
                _swap(buf_v, buf_i, j, store)
                store += 1
        _swap(buf_v, buf_i, store, hi)
        if store == target:
            return
        if store < target:
            lo = store + 1
        else:
            hi = store - 1


@numba.njit(cache=True)
def _select_nearest(q_row, n, buf_v, buf_i, nearest):
    """Writes to nearest[:n] the n codes closest to one frame, by (distance, index): ties at the n-th place keep the
    lowest indices. buf_v/buf_i are scratch of length K.

    The largest of n group minima is a bar that at least n codes meet (the n minima themselves), and usually few more:
    one cheap pass finds it, a second collects the codes at or below it (branch-free), and a quickselect over those
    few candidates picks the exact n.
    """
    num_codes = q_row.shape[0]
    bar = -np.inf
    for g in range(n):
        lo = g * num_codes // n
        hi = (g + 1) * num_codes // n
        group_min = q_row[lo]
        for k in range(lo + 1, hi):
            group_min = min(group_min, q_row[k])
        bar = max(bar, group_min)
    count = 0
    for k in range(num_codes):
        v = q_row[k]
        buf_v[count] = v
        buf_i[count] = k
        count += v <= bar
    _partial_select(buf_v, buf_i, count, n)
    for j in range(n):
        nearest[j] = buf_i[j]


@numba.njit(cache=True)
def _viterbi_step(q_row, t, lmbda, prev_min, cost, seg_start, prev_states, n_prev, states, n, new_cost):
    """One column of the recursion, in place. Returns (min cost, lowest-index argmin) of the new column.

    `states[:n]` are the frame's allowed codes, `prev_states[:n_prev]` the previous frame's; cost is +inf for every
    other code. A state stays when its own cost is <= prev_min + lmbda (on a tie the longer segment wins, as
    upstream's earliest segment start does); otherwise it starts a new segment at t from the previous argmin.
    """
    switch_cost = prev_min + lmbda if t > 0 else 0.0
    for j in range(n):
        k = states[j]
        c = cost[k]  # +inf unless k was allowed at t-1
        if t > 0 and c <= switch_cost:
            c = c + q_row[k]
        else:
            c = switch_cost + q_row[k]
            seg_start[k] = t
        new_cost[j] = c
    for j in range(n_prev):
        cost[prev_states[j]] = np.inf
    best = np.inf
    best_k = -1
    for j in range(n):
        k = states[j]
        c = new_cost[j]
        cost[k] = c
        if c < best or (c == best and k < best_k):
            best = c
            best_k = k
    return best, best_k


@numba.njit(cache=True)
def _allowed_states(q_row, n, buf_v, buf_i, states):
    """The frame's allowed codes into states[:n]: its n nearest, or all codes (already there) when n == K."""
    if n < q_row.shape[0]:
        _select_nearest(q_row, n, buf_v, buf_i, states)


@numba.njit(cache=True)
def _dpdp_kernel(q, n, lmbda):
    """Offline Viterbi + traceback over a (T, K) distance matrix; returns the (T,) units."""
    num_frames, num_codes = q.shape
    cost = np.full(num_codes, np.inf)
    seg_start = np.zeros(num_codes, np.int64)
    states = np.arange(n)  # the n == K case: every code, fixed
    prev_states = np.arange(n)
    new_cost = np.empty(n)
    buf_v = np.empty(num_codes, q.dtype)
    buf_i = np.empty(num_codes, np.int64)
    # The argmin state at each frame and where its segment started: all the traceback needs.
    best_unit = np.empty(num_frames, np.int64)
    best_start = np.empty(num_frames, np.int64)
    m = 0.0
    n_prev = 0
    for t in range(num_frames):
        _allowed_states(q[t], n, buf_v, buf_i, states)
        m, a = _viterbi_step(q[t], t, lmbda, m, cost, seg_start, prev_states, n_prev, states, n, new_cost)
        states, prev_states = prev_states, states
        n_prev = n
        best_unit[t] = a
        best_start[t] = seg_start[a]
    units = np.empty(num_frames, np.int64)
    t = num_frames - 1
    while t >= 0:
        start = best_start[t]
        units[start : t + 1] = best_unit[t]
        t = start - 1
    return units


# Streaming. A path is a chain of segment nodes; a node is identified by (unit, start), because the segment that
# precedes a segment starting at s is always the argmin path at frame s-1: the node (win_unit[s-1], win_start[s-1]).
# `win_unit`/`win_start` hold, for frames win_base.., the argmin state and its segment start.
# istate layout: [open_unit, open_start, committed, forced, last_argmin, n_prev]; the open node is the deepest node
# common to all live paths, whose start is final but whose end is not yet known.
_OPEN_UNIT, _OPEN_START, _COMMITTED, _FORCED, _LAST_ARGMIN, _N_PREV = range(6)


@numba.njit(cache=True)
def _emit_above(node_unit, node_start, win_unit, win_start, win_base, istate, out, n_out, chain_u, chain_s):
    """Emits the segments from the open node down to (not including) node, whose ends are now known."""
    stop = max(istate[_OPEN_START], 0)
    length = 0
    u = node_unit
    s = node_start
    while s > stop:
        chain_u[length] = u
        chain_s[length] = s
        length += 1
        u = win_unit[s - 1 - win_base]
        s = win_start[s - 1 - win_base]
    # (u, s) is now the old open node, or the stream's first segment when none was open yet.
    if length > 0:
        out[n_out, 0] = u
        out[n_out, 1] = s
        out[n_out, 2] = chain_s[length - 1]
        n_out += 1
        for j in range(length - 1, 0, -1):
            out[n_out, 0] = chain_u[j]
            out[n_out, 1] = chain_s[j]
            out[n_out, 2] = chain_s[j - 1]
            n_out += 1
    istate[_OPEN_UNIT] = node_unit
    istate[_OPEN_START] = node_start
    return n_out


@numba.njit(cache=True)
def _advance_commit(t, m, lmbda, cost, seg_start, states, n, win_unit, win_start, win_base, istate, out, n_out,
                    ent_u, ent_s, ent_c, chain_u, chain_s):
    """Finds the longest prefix common to every live path after frame t, commits it and emits finished segments."""
    threshold = m + lmbda
    # Live leaves: one per state that can still be on the optimum (any other is beaten by switching from the
    # argmin). ent_c = first frame where this entry's path may leave the entry's node (t + 1 for a running leaf).
    count = 0
    for j in range(n):
        k = states[j]
        if cost[k] <= threshold:
            ent_u[count] = k
            ent_s[count] = seg_start[k]
            ent_c[count] = t + 1
            count += 1
    # Walk the latest-starting nodes up to their (shared) parent until one node is left: the deepest common node.
    while count > 1:
        s_max = 0
        for i in range(count):
            s_max = max(s_max, ent_s[i])
        if s_max == 0:
            return n_out  # the live paths already differ at frame 0: nothing is decided yet
        parent_u = win_unit[s_max - 1 - win_base]
        parent_s = win_start[s_max - 1 - win_base]
        kept = 0
        found = -1
        for i in range(count):
            if ent_s[i] == s_max:
                continue
            ent_u[kept] = ent_u[i]
            ent_s[kept] = ent_s[i]
            ent_c[kept] = ent_c[i]
            if ent_u[kept] == parent_u and ent_s[kept] == parent_s:
                found = kept
            kept += 1
        if found >= 0:
            ent_c[found] = min(ent_c[found], s_max)
        else:
            ent_u[kept] = parent_u
            ent_s[kept] = parent_s
            ent_c[kept] = s_max
            kept += 1
        count = kept
    istate[_COMMITTED] = max(istate[_COMMITTED], ent_c[0])
    return _emit_above(ent_u[0], ent_s[0], win_unit, win_start, win_base, istate, out, n_out, chain_u, chain_s)


@numba.njit(cache=True)
def _node_covering(frame, unit, start, win_unit, win_start, win_base):
    """The node on the path ending in (unit, start) whose segment contains `frame`."""
    while start > frame:
        unit, start = win_unit[start - 1 - win_base], win_start[start - 1 - win_base]
    return unit, start


@numba.njit(cache=True)
def _force_prefix(frame, argmin, m, lmbda, cost, seg_start, states, n, win_unit, win_start, win_base):
    """Forces frames <= frame to follow the current best path by dropping every live state that disagrees there."""
    best_u, best_s = _node_covering(frame, argmin, seg_start[argmin], win_unit, win_start, win_base)
    threshold = m + lmbda
    for j in range(n):
        k = states[j]
        if cost[k] <= threshold:
            u, s = _node_covering(frame, k, seg_start[k], win_unit, win_start, win_base)
            if u != best_u or s != best_s:  # a path through another node differs from the best somewhere <= frame
                cost[k] = np.inf


@numba.njit(cache=True)
def _stream_kernel(q, first_frame, n, lmbda, max_lag, cost, seg_start, prev_states, fstate, istate,
                   win_unit, win_start, win_base, out, ent_u, ent_s, ent_c, chain_u, chain_s):
    """Runs the recursion over one chunk, committing what is final. Returns the number of segments written to out.

    prev_states[:istate[_N_PREV]] (the last frame's allowed codes) is updated in place.
    """
    num_codes = cost.shape[0]
    states = np.arange(n)
    new_cost = np.empty(n)
    buf_v = np.empty(num_codes, q.dtype)
    buf_i = np.empty(num_codes, np.int64)
    n_prev = istate[_N_PREV]
    n_out = 0
    m = fstate[0]
    t = first_frame
    for i in range(q.shape[0]):
        t = first_frame + i
        _allowed_states(q[i], n, buf_v, buf_i, states)
        m, a = _viterbi_step(q[i], t, lmbda, m, cost, seg_start, prev_states, n_prev, states, n, new_cost)
        prev_states[:] = states
        n_prev = n
        win_unit[t - win_base] = a
        win_start[t - win_base] = seg_start[a]
        istate[_LAST_ARGMIN] = a
        if max_lag >= 0:
            # With a lag bound, decisions are checked per frame so that they do not depend on the chunking either.
            n_out = _advance_commit(t, m, lmbda, cost, seg_start, states, n, win_unit, win_start, win_base, istate,
                                    out, n_out, ent_u, ent_s, ent_c, chain_u, chain_s)
            must_commit = t - max_lag + 1  # frames before this one may wait no longer
            if istate[_COMMITTED] < must_commit:
                _force_prefix(must_commit - 1, a, m, lmbda, cost, seg_start, states, n, win_unit, win_start,
                              win_base)
                istate[_FORCED] += 1
                n_out = _advance_commit(t, m, lmbda, cost, seg_start, states, n, win_unit, win_start, win_base,
                                        istate, out, n_out, ent_u, ent_s, ent_c, chain_u, chain_s)
    if max_lag < 0 and q.shape[0] > 0:
        n_out = _advance_commit(t, m, lmbda, cost, seg_start, states, n, win_unit, win_start, win_base, istate,
                                out, n_out, ent_u, ent_s, ent_c, chain_u, chain_s)
    fstate[0] = m
    istate[_N_PREV] = n_prev
    return n_out


@numba.njit(cache=True)
def _flush_kernel(num_frames, seg_start, win_unit, win_start, win_base, istate, out, chain_u, chain_s):
    """End of stream: commits the best final state's path (the offline traceback). Returns segments written."""
    a = istate[_LAST_ARGMIN]
    n_out = _emit_above(a, seg_start[a], win_unit, win_start, win_base, istate, out, 0, chain_u, chain_s)
    out[n_out, 0] = a
    out[n_out, 1] = seg_start[a]
    out[n_out, 2] = num_frames
    istate[_COMMITTED] = num_frames
    return n_out + 1
