"""
Six algorithmic tasks, each solvable by several named strategies with known ground truth.

Every task maps an input x to several *traces* y, one per strategy: a real step-by-step
execution that ends in the same final answer. A training record is

    <bos> <x> ...x tokens... </x> <z> <z_empty> </z> <y> ...trace... </y> <eos>

The `<z> <z_empty> </z>` slot is a no-op in stage 1; stage 2 writes a latent there (a token
`<zk>`, or a vector added at `<z_empty>`), so the factorized model starts exactly where the
base model is. Every trace ends with `ans` followed by the final answer (grid's answer is the path
its steps write, so nothing follows its `ans`).

The data-generating process (DGP) draws x, then a strategy s ~ p*(s|x), then y = trace(x, s):

    p*(y|x) = sum_s p*(s|x) [trace(x, s) == y]

`log_prob` computes this exactly. p*(s|x) is uniform by default; with
`mixture="input-dependent"` the strategy `feature(x)` (a visible property of x, documented per
task) gets probability 0.7 and the others share the rest.

Worked examples (one input, its trace under every strategy):

list_summation (sum)             x: 3 + 7 + 1 + 4 + 2
  left-to-right     3 + 7 = 1 0 ; 1 0 + 1 = 1 1 ; 1 1 + 4 = 1 5 ; 1 5 + 2 = 1 7 ; ans 1 7
  right-to-left     2 + 4 = 6 ; 6 + 1 = 7 ; 7 + 7 = 1 4 ; 1 4 + 3 = 1 7 ; ans 1 7
  pairwise          3 + 7 = 1 0 ; 1 + 4 = 5 ; 1 0 + 5 = 1 5 ; 1 5 + 2 = 1 7 ; ans 1 7
sorting_algorithms (sort)        x: 3 1 4 0 2 5    (the array after each outer step)
  bubble-sort       1 3 0 2 4 5 ; 1 0 2 3 4 5 ; 0 1 2 3 4 5 ; 0 1 2 3 4 5 ; 0 1 2 3 4 5 ; ans 0 1 2 3 4 5
  selection-sort    0 1 4 3 2 5 ; 0 1 4 3 2 5 ; 0 1 2 3 4 5 ; 0 1 2 3 4 5 ; 0 1 2 3 4 5 ; ans ...
  insertion-sort    1 3 4 0 2 5 ; 1 3 4 0 2 5 ; 0 1 3 4 2 5 ; 0 1 2 3 4 5 ; 0 1 2 3 4 5 ; ans ...
  merge-sort        1 3 0 4 2 5 ; 0 1 3 4 2 5 ; 0 1 2 3 4 5 ; ans ...
  heap-sort         5 2 4 0 1 3 ; 4 2 3 0 1 5 ; 3 2 1 0 4 5 ; 2 0 1 3 4 5 ; 1 0 2 3 4 5 ; 0 1 2 3 4 5 ; ans ...
grid_pathfinding (grid)          x: S 1 2 G 3 4    (from row 1 col 2 to row 3 col 4)
  right-first       R 1 3 ; R 1 4 ; D 2 4 ; D 3 4 ; ans
  down-first        D 2 2 ; D 3 2 ; R 3 3 ; R 3 4 ; ans
  alternating       R 1 3 ; D 2 3 ; R 2 4 ; D 3 4 ; ans
linear_equation_solving (linear) x: 7 x + 1 2 = 3 x + 2 8
  (shared first step: collect x on the left)  4 x + 1 2 = 2 8 ;
  subtract-then-divide  ... 4 x = 2 8 - 1 2 = 1 6 ; x = 1 6 / 4 = 4 ; ans 4
  divide-then-subtract  ... x + 1 2 / 4 = 2 8 / 4 ; x + 3 = 7 ; x = 7 - 3 = 4 ; ans 4
  inverse-ops           ... 2 8 - 1 2 = 1 6 ; 1 6 / 4 = 4 ; ans 4
base_conversion (base)           x: 0 3 8 to 4             (decimal 38 into base 4)
  repeated-division 0 0 9 r 2 ; 0 0 2 r 1 ; 0 0 0 r 2 ; ans 2 1 2  (quotient r remainder)
  via-binary        0 1 9 r 0 ; 0 0 9 r 1 ; 0 0 4 r 1 ; 0 0 2 r 0 ; 0 0 1 r 0 ; 0 0 0 r 1 ;
                    1 0 0 1 1 0 | 1 0 = 2 ; 0 1 = 1 ; 1 0 = 2 ; ans 2 1 2
  decomposition     2 * 0 1 6 = 0 3 2 r 0 0 6 ; 1 * 0 0 4 = 0 0 4 r 0 0 2 ;
                    2 * 0 0 1 = 0 0 2 r 0 0 0 ; ans 2 1 2
multidigit_addition (add)        x: 4 5 7 + 9 8 6
  right-to-left-carry    0 + 7 + 6 = 1 3 ; 1 + 5 + 8 = 1 4 ; 1 + 4 + 9 = 1 4 ; ans 1 4 4 3
  left-to-right-partials 4 + 9 = 1 3 ; 1 3 0 + 5 + 8 = 1 4 3 ; 1 4 3 0 + 7 + 6 = 1 4 4 3 ; ans 1 4 4 3
  rounding-decomposition 9 8 6 = 1 0 0 0 - 1 4 ; 4 5 7 + 1 0 0 0 = 1 4 5 7 ; 1 4 5 7 - 1 4 = 1 4 4 3 ; ans 1 4 4 3

Run `python tasks.py` to print these examples and the statistics of every task.
"""

import inspect
import math
import random
import sys
import time
import zlib
from dataclasses import dataclass

# ----------------------------------------------------------------------------------------------
# Vocabulary: one for all tasks, so a multi-task model stays possible.

SPECIALS = ["<pad>", "<bos>", "<eos>", "<x>", "</x>", "<z>", "<z_empty>", "</z>", "<y>", "</y>"]
MAX_LATENTS = 8  # <z1> .. <z8>; stage 2 uses the first K
LATENT_TOKENS = [f"<z{k}>" for k in range(1, MAX_LATENTS + 1)]
DIGITS = [str(d) for d in range(10)]
WORDS = ["+", "-", "*", "/", "=", ";", "|", "x", "r", "R", "D", "S", "G", "base", "to", "ans"]
VOCAB = SPECIALS + LATENT_TOKENS + DIGITS + WORDS
STOI = {token: i for i, token in enumerate(VOCAB)}
PAD, BOS, EOS = STOI["<pad>"], STOI["<bos>"], STOI["<eos>"]


def encode(tokens):
    """List of token strings -> list of ids; an unknown token raises ValueError naming it."""
    try:
        return [STOI[t] for t in tokens]
    except KeyError as e:
        raise ValueError(f"unknown token {e.args[0]!r}; the vocabulary is {VOCAB}") from None


def decode(ids):
    """List of ids -> list of token strings."""
    return [VOCAB[i] for i in ids]


def prompt_tokens(x_tokens, latent="<z_empty>"):
    """The prompt that precedes y: <bos> <x> ... </x> <z> latent </z> <y>."""
    return ["<bos>", "<x>", *x_tokens, "</x>", "<z>", latent, "</z>", "<y>"]


def record_tokens(x_tokens, y_tokens, latent="<z_empty>"):
    """A full training record: prompt, then y, </y>, <eos>."""
    return prompt_tokens(x_tokens, latent) + list(y_tokens) + ["</y>", "<eos>"]


def num(n, width=0):
    """An integer as digit tokens, padded with zeros to width: 38 -> ['3', '8'], (7, 2) -> ['0', '7']."""
    return list(str(n).zfill(width))


def read_int(tokens):
    """Digit tokens -> int, or None unless they are a canonical non-negative integer."""
    if not tokens or any(t not in DIGITS for t in tokens) or (tokens[0] == "0" and len(tokens) > 1):
        return None
    return int("".join(tokens))


# ----------------------------------------------------------------------------------------------
# The task interface


@dataclass(frozen=True)
class Check:
    """What `Task.check` finds out about a generated y."""
    parsed: bool  # y ends in 'ans' + a well-formed answer
    correct: bool  # that answer is right for x
    strategies: frozenset  # every strategy whose trace equals y exactly (empty: none)


class Task:
    """Base class: subclasses define the inputs, the traces and how to read an answer."""
    name = ""
    alias = ""
    strategies = ()
    # raised when a task changes what it writes (inputs, traces, the strategy a mixture favours):
    # base models of an earlier revision no longer count in the benchmark, nor the stage-2 runs on them
    revision = 1

    def __init__(self, mixture="uniform"):
        if mixture not in ("uniform", "input-dependent"):
            raise ValueError(f"mixture must be 'uniform' or 'input-dependent', got {mixture!r}")
        self.mixture = mixture

    # --- defined by each task
    def sample_input(self, rng):
        raise NotImplementedError

    def input_tokens(self, x):
        raise NotImplementedError

    def trace(self, x, strategy):
        raise NotImplementedError

    def answer(self, x):
        raise NotImplementedError

    def read_answer(self, tokens):
        """The tokens after 'ans' -> the answer, or None."""
        raise NotImplementedError

    def feature(self, x):
        """Index of the strategy favoured by the input-dependent mixture."""
        raise NotImplementedError

    # --- shared
    def is_correct(self, x, answer):
        return answer == self.answer(x)

    def parse_answer(self, y_tokens):
        """The final answer written after the single 'ans' token, or None."""
        y_tokens = list(y_tokens)
        if y_tokens.count("ans") != 1:
            return None
        return self.read_answer(y_tokens[y_tokens.index("ans") + 1:])

    def traces(self, x):
        """dict strategy -> trace tokens."""
        return {s: self.trace(x, s) for s in self.strategies}

    def branch_targets(self, x, y_tokens):
        """The data's exact next-token distribution where x's traces part: {t: {token: p*(token | x, y_<t)}}
        for each position t of y_tokens + ['</y>'] at which the strategies that wrote y_<t (weighted by
        p*(s|x)) write more than one token. At every other position the next token is certain."""
        y = list(y_tokens) + ["</y>"]
        p_star = self.strategy_probs(x)
        alive = [(p_star[s], t + ["</y>"]) for s, t in self.traces(x).items()]
        branches = {}
        for t, token in enumerate(y):
            next_mass = {}
            for p, trace in alive:
                next_mass[trace[t]] = next_mass.get(trace[t], 0.0) + p
            if len(next_mass) > 1:
                total = sum(next_mass.values())
                branches[t] = {tok: m / total for tok, m in next_mass.items()}
            alive = [(p, trace) for p, trace in alive if trace[t] == token]
            if not alive:
                raise ValueError(f"{' '.join(y_tokens)} is not a trace of {x}")
        return branches

    def check(self, x, y_tokens):
        y_tokens = list(y_tokens)
        answer = self.parse_answer(y_tokens)
        parsed = answer is not None
        matches = frozenset(s for s, t in self.traces(x).items() if t == y_tokens)
        return Check(parsed, parsed and self.is_correct(x, answer), matches)

    def strategy_probs(self, x):
        """p*(s|x) as a dict strategy -> probability."""
        S = len(self.strategies)
        if self.mixture == "uniform":
            return {s: 1.0 / S for s in self.strategies}
        favoured = self.strategies[self.feature(x)]
        return {s: 0.7 if s == favoured else 0.3 / (S - 1) for s in self.strategies}

    def log_prob(self, x, y_tokens):
        """Exact log p*(y|x) = log sum_s p*(s|x) [trace(x, s) == y]; -inf for a non-trace."""
        y_tokens = list(y_tokens)
        probs = self.strategy_probs(x)
        p = sum(probs[s] for s, t in self.traces(x).items() if t == y_tokens)
        return math.log(p) if p > 0 else -math.inf

    def sample_strategy(self, x, rng):
        probs = self.strategy_probs(x)
        return rng.choices(self.strategies, weights=[probs[s] for s in self.strategies])[0]

    def sample(self, rng, split="train"):
        """One DGP draw (x, strategy, y) with x from the given split ('train' or 'test')."""
        x = sample_split_input(self, rng, split)
        s = self.sample_strategy(x, rng)
        return x, s, self.trace(x, s)


def input_split(x_tokens, test_fraction=0.1):
    """'test' for a fixed hash-chosen fraction of inputs, else 'train': held-out x never trains."""
    h = zlib.crc32(" ".join(x_tokens).encode())
    return "test" if h % 1000 < test_fraction * 1000 else "train"


MAX_SPLIT_DRAWS = 10_000  # a split this rare is (nearly) empty: fail instead of looping


def sample_split_input(task, rng, split):
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    for _ in range(MAX_SPLIT_DRAWS):
        x = task.sample_input(rng)
        if input_split(task.input_tokens(x)) == split:
            return x
    raise ValueError(f"{task.name}: no {split} input in {MAX_SPLIT_DRAWS} draws; its options "
                     f"({task_options_text(task)}) leave too few distinct inputs for a {split} split")


def task_options_text(task):
    """The task's integer knobs as key=value, e.g. 'n=5, max_value=9'."""
    return ", ".join(f"{k}={getattr(task, k)}" for k in integer_options(type(task)) if hasattr(task, k))


# ----------------------------------------------------------------------------------------------
# The six tasks


class ListSummation(Task):
    """Sum n numbers. feature(x) = first number mod 3."""
    name, alias = "list_summation", "sum"
    strategies = ("left-to-right", "right-to-left", "pairwise")

    def __init__(self, mixture="uniform", n=5, max_value=9):
        super().__init__(mixture)
        self.n, self.max_value = n, max_value  # list length; values drawn from 1..max_value
        # every number is written with the digits of the largest sum (7 -> 0 7), so each step of a
        # trace has the same length and the operand to copy sits at a fixed offset
        self.width = len(str(n * max_value))

    def sample_input(self, rng):
        return [rng.randint(1, self.max_value) for _ in range(self.n)]

    def input_tokens(self, x):
        tokens = num(x[0], self.width)
        for v in x[1:]:
            tokens += ["+", *num(v, self.width)]
        return tokens

    def trace(self, x, strategy):
        y = []

        def add(a, b):
            y.extend([*num(a, self.width), "+", *num(b, self.width), "=", *num(a + b, self.width), ";"])
            return a + b

        if strategy == "left-to-right":
            acc = x[0]
            for v in x[1:]:
                acc = add(acc, v)
        elif strategy == "right-to-left":
            acc = x[-1]
            for v in reversed(x[:-1]):
                acc = add(acc, v)
        elif strategy == "pairwise":  # a tree of pair sums, level by level; an odd one carries over
            level = list(x)
            while len(level) > 1:
                level = [add(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                         for i in range(0, len(level), 2)]
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        return y + ["ans", *num(sum(x))]

    def answer(self, x):
        return sum(x)

    def read_answer(self, tokens):
        return read_int(tokens)

    def feature(self, x):
        return x[0] % 3


class SortingAlgorithms(Task):
    """Sort n distinct digits; the trace is the array after each outer step. feature(x) = x[0] mod 5."""
    name, alias = "sorting_algorithms", "sort"
    strategies = ("bubble-sort", "selection-sort", "insertion-sort", "merge-sort", "heap-sort")

    def __init__(self, mixture="uniform", n=6):
        super().__init__(mixture)
        if not 2 <= n <= 10:
            raise ValueError(f"sorting needs 2 <= n <= 10 distinct digits, got n={n}")
        self.n = n  # list length (distinct digits 0..9)

    def sample_input(self, rng):
        return rng.sample(range(10), self.n)

    def input_tokens(self, x):
        return [str(v) for v in x]

    @staticmethod
    def _states(x, strategy):
        a, n, states = list(x), len(x), []
        if strategy == "bubble-sort":
            for i in range(n - 1):
                for j in range(n - 1 - i):
                    if a[j] > a[j + 1]:
                        a[j], a[j + 1] = a[j + 1], a[j]
                states.append(list(a))
        elif strategy == "selection-sort":
            for i in range(n - 1):
                m = min(range(i, n), key=a.__getitem__)
                a[i], a[m] = a[m], a[i]
                states.append(list(a))
        elif strategy == "insertion-sort":
            for i in range(1, n):
                v, j = a[i], i - 1
                while j >= 0 and a[j] > v:
                    a[j + 1] = a[j]
                    j -= 1
                a[j + 1] = v
                states.append(list(a))
        elif strategy == "merge-sort":  # bottom-up: merge runs of width 1, 2, 4, ...
            width = 1
            while width < n:
                merged = []
                for lo in range(0, n, 2 * width):
                    left, right = a[lo:lo + width], a[lo + width:lo + 2 * width]
                    while left and right:
                        merged.append(left.pop(0) if left[0] <= right[0] else right.pop(0))
                    merged += left + right
                a = merged
                states.append(list(a))
                width *= 2
        elif strategy == "heap-sort":  # build a max-heap, then move the max to the end n-1 times

            def sift_down(root, end):
                while 2 * root + 1 < end:
                    child = 2 * root + 1
                    if child + 1 < end and a[child + 1] > a[child]:
                        child += 1
                    if a[root] >= a[child]:
                        return
                    a[root], a[child] = a[child], a[root]
                    root = child

            for root in range(n // 2 - 1, -1, -1):
                sift_down(root, n)
            states.append(list(a))
            for end in range(n - 1, 0, -1):
                a[0], a[end] = a[end], a[0]
                sift_down(0, end)
                states.append(list(a))
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        return states

    def trace(self, x, strategy):
        y = []
        for state in self._states(x, strategy):
            y += [str(v) for v in state] + [";"]
        return y + ["ans"] + [str(v) for v in sorted(x)]

    def answer(self, x):
        return sorted(x)

    def read_answer(self, tokens):
        if not tokens or any(t not in DIGITS for t in tokens):
            return None
        return [int(t) for t in tokens]

    def feature(self, x):
        return x[0] % 5


class GridPathfinding(Task):
    """Shortest monotone path from S to G on a grid; each move writes the new cell, and those steps are
    the answer. feature(x) = (start row + start col) mod 3."""
    name, alias = "grid_pathfinding", "grid"
    strategies = ("right-first", "down-first", "alternating")
    # 3: a 10x10 grid whose steps are the answer (2: 8x8, the moves copied after 'ans'; 1: long paths rare)
    revision = 3

    def __init__(self, mixture="uniform", size=10, min_steps=2):
        super().__init__(mixture)
        if not (1 <= min_steps and 2 * min_steps <= 2 * (size - 1) and size <= 10):
            raise ValueError(f"grid needs size <= 10 and 1 <= min_steps < size, got {size}, {min_steps}")
        self.size = size  # rows and columns are 0..size-1 (single digits)
        self.min_steps = min_steps  # at least this many moves down and right (2: all traces differ)

    def sample_input(self, rng):
        (r0, r1), (c0, c1) = self.sample_span(rng), self.sample_span(rng)
        return (r0, c0, r1, c1)

    def sample_span(self, rng):
        """(start, end) on one axis, uniform over the pairs at least min_steps apart, so that every
        input is equally likely and the longest paths are not the rarest (docs/experiments.md)."""
        while True:
            start, end = rng.randint(0, self.size - 1), rng.randint(0, self.size - 1)
            if end - start >= self.min_steps:
                return start, end

    def input_tokens(self, x):
        r0, c0, r1, c1 = x
        return ["S", str(r0), str(c0), "G", str(r1), str(c1)]

    def moves(self, x, strategy):
        r0, c0, r1, c1 = x
        down, right = r1 - r0, c1 - c0
        if strategy == "right-first":
            return ["R"] * right + ["D"] * down
        if strategy == "down-first":
            return ["D"] * down + ["R"] * right
        if strategy == "alternating":  # R D R D ... until one direction is used up
            k = min(down, right)
            return ["R", "D"] * k + ["R"] * (right - k) + ["D"] * (down - k)
        raise ValueError(f"unknown strategy {strategy!r}")

    def trace(self, x, strategy):
        r, c = x[0], x[1]
        y = []
        for m in self.moves(x, strategy):
            r, c = (r + 1, c) if m == "D" else (r, c + 1)
            y += [m, str(r), str(c), ";"]
        return y + ["ans"]

    def parse_answer(self, y_tokens):
        """The path is the answer, read from y itself: its steps `move row col ;` closed by 'ans' ->
        [(move, row, col), ...], or None. Nothing follows 'ans', so no step has to be copied."""
        y_tokens = list(y_tokens)
        if len(y_tokens) < 5 or len(y_tokens) % 4 != 1 or y_tokens[-1] != "ans":
            return None
        steps = [tuple(y_tokens[i:i + 4]) for i in range(0, len(y_tokens) - 1, 4)]
        if any(m not in ("R", "D") or r not in DIGITS or c not in DIGITS or end != ";" for m, r, c, end in steps):
            return None
        return [(m, int(r), int(c)) for m, r, c, _ in steps]

    def answer(self, x):
        """The canonical (right-first) path; `is_correct` accepts every shortest path."""
        return self.parse_answer(self.trace(x, "right-first"))

    def is_correct(self, x, answer):
        """Each step writes the cell its move leads to, and the last one is G."""
        r, c = x[0], x[1]
        for move, row, col in answer:
            r, c = (r + 1, c) if move == "D" else (r, c + 1)
            if (row, col) != (r, c):
                return False
        return (r, c) == (x[2], x[3])

    def feature(self, x):
        return (x[0] + x[1]) % 3


class LinearEquationSolving(Task):
    """Solve a x + b = c x + d for a positive integer x. feature(x) = c mod 3."""
    name, alias = "linear_equation_solving", "linear"
    strategies = ("subtract-then-divide", "divide-then-subtract", "inverse-ops")

    def __init__(self, mixture="uniform", max_coef=5, max_value=9):
        super().__init__(mixture)
        self.max_coef = max_coef  # a - c is drawn from 2..max_coef, c from 1..4
        self.max_value = max_value  # the solution and b / (a - c) are drawn from 1..max_value

    def sample_input(self, rng):
        k, c = rng.randint(2, self.max_coef), rng.randint(1, 4)  # k = a - c
        m, v = rng.randint(1, self.max_value), rng.randint(1, self.max_value)  # b = k m; x = v
        return (k + c, k * m, c, k * (v + m))  # a, b, c, d with b and d divisible by k

    def input_tokens(self, x):
        a, b, c, d = x
        return [*num(a), "x", "+", *num(b), "=", *num(c), "x", "+", *num(d)]

    def trace(self, x, strategy):
        a, b, c, d = x
        k, v = a - c, (d - b) // (a - c)
        y = [*num(k), "x", "+", *num(b), "=", *num(d), ";"]  # shared: collect x on the left
        if strategy == "subtract-then-divide":
            y += [*num(k), "x", "=", *num(d), "-", *num(b), "=", *num(d - b), ";",
                  "x", "=", *num(d - b), "/", *num(k), "=", *num(v), ";"]
        elif strategy == "divide-then-subtract":
            y += ["x", "+", *num(b), "/", *num(k), "=", *num(d), "/", *num(k), ";",
                  "x", "+", *num(b // k), "=", *num(d // k), ";",
                  "x", "=", *num(d // k), "-", *num(b // k), "=", *num(v), ";"]
        elif strategy == "inverse-ops":  # undo '+ b' then '* k', last operation first
            y += [*num(d), "-", *num(b), "=", *num(d - b), ";",
                  *num(d - b), "/", *num(k), "=", *num(v), ";"]
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        return y + ["ans", *num(v)]

    def answer(self, x):
        a, b, c, d = x
        return (d - b) // (a - c)

    def read_answer(self, tokens):
        return read_int(tokens)

    def feature(self, x):
        return x[2] % 3


class BaseConversion(Task):
    """Write a decimal number in a target base (4 or 8). Every strategy starts from the decimal
    value itself, so no step is shared before the strategies part. feature(x) = units digit mod 3."""
    name, alias = "base_conversion", "base"
    strategies = ("repeated-division", "via-binary", "decomposition")

    def __init__(self, mixture="uniform", max_value=999, target_bases=(4, 8)):
        super().__init__(mixture)
        if any(b & (b - 1) or b < 4 for b in target_bases):
            raise ValueError("target bases must be powers of two >= 4 (for via-binary)")
        # the value is drawn from 8..max_value; 8..255 is 496 inputs, few enough to memorise
        self.max_value = max_value
        self.target_bases = tuple(target_bases)
        # every decimal number is written with max_value's digits (38 -> 0 3 8), so each step of a
        # trace has the same length and the number it divides sits at a fixed offset
        self.width = len(str(max_value))

    @property
    def revision(self):
        # input-dependent 2: the units digit picks the strategy (1: the value mod 3, which the digits
        # show only through their sum); the uniform mixture writes what it always did
        return 2 if self.mixture == "input-dependent" else 1

    def sample_input(self, rng):
        return (rng.randint(8, self.max_value), rng.choice(self.target_bases))

    @staticmethod
    def digits(n, base):
        """Digits of n in base, most significant first."""
        out = []
        while True:
            n, r = divmod(n, base)
            out.append(r)
            if n == 0:
                return out[::-1]

    def input_tokens(self, x):
        n, target = x
        return [*num(n, self.width), "to", str(target)]

    def trace(self, x, strategy):
        n, target = x
        y = []
        if strategy == "repeated-division":  # quotient r remainder, until the quotient is 0
            q = n
            while q:
                q, r = divmod(q, target)
                y += [*num(q, self.width), "r", str(r), ";"]
        elif strategy == "via-binary":  # halve to get the bits, then group them from the right
            q = n
            while q:
                q, r = divmod(q, 2)
                y += [*num(q, self.width), "r", str(r), ";"]
            bits, group_size = self.digits(n, 2), target.bit_length() - 1  # bits per target digit
            bits = [0] * (-len(bits) % group_size) + bits
            y += [str(b) for b in bits] + ["|"]
            for i in range(0, len(bits), group_size):
                group = bits[i:i + group_size]
                y += [str(b) for b in group] + ["=", str(int("".join(map(str, group)), 2)), ";"]
        elif strategy == "decomposition":  # greedy: digit * power of the target base = product, remainder
            rest = n
            for p in reversed(range(len(self.digits(n, target)))):
                d, rest = divmod(rest, target ** p)
                y += [str(d), "*", *num(target ** p, self.width), "=", *num(d * target ** p, self.width), "r",
                      *num(rest, self.width), ";"]
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        return y + ["ans"] + [str(d) for d in self.digits(n, target)]

    def answer(self, x):
        n, target = x
        return "".join(str(d) for d in self.digits(n, target))

    def read_answer(self, tokens):
        if not tokens or any(t not in DIGITS for t in tokens) or (tokens[0] == "0" and len(tokens) > 1):
            return None
        return "".join(tokens)

    def feature(self, x):
        return x[0] % 10 % 3


class MultidigitAddition(Task):
    """Add two n-digit numbers. feature(x) = leading digit of the first number mod 3."""
    name, alias = "multidigit_addition", "add"
    strategies = ("right-to-left-carry", "left-to-right-partials", "rounding-decomposition")

    def __init__(self, mixture="uniform", n_digits=3):
        super().__init__(mixture)
        self.n_digits = n_digits  # both numbers have exactly this many digits

    def sample_input(self, rng):
        lo, hi = 10 ** (self.n_digits - 1), 10 ** self.n_digits - 1
        return (rng.randint(lo, hi), rng.randint(lo, hi))

    def input_tokens(self, x):
        return [*num(x[0]), "+", *num(x[1])]

    def trace(self, x, strategy):
        a, b = x
        da, db, y = num(a), num(b), []
        if strategy == "right-to-left-carry":  # column by column from the units, with carry
            carry = 0
            for i in reversed(range(len(da))):  # the carry first: a 0 opens this strategy, and no other
                s = int(da[i]) + int(db[i]) + carry
                y += [str(carry), "+", da[i], "+", db[i], "=", *num(s), ";"]
                carry = s // 10
        elif strategy == "left-to-right-partials":  # acc*10 + column sum, from the top column
            acc = int(da[0]) + int(db[0])
            y += [da[0], "+", db[0], "=", *num(acc), ";"]
            for i in range(1, len(da)):
                new = acc * 10 + int(da[i]) + int(db[i])
                y += [*num(acc * 10), "+", da[i], "+", db[i], "=", *num(new), ";"]
                acc = new
        elif strategy == "rounding-decomposition":  # round b up to a round number, fix afterwards
            unit = 10 ** (len(db) - 1)
            rounded = -(-b // unit) * unit
            y += [*num(b), "=", *num(rounded), "-", *num(rounded - b), ";",
                  *num(a), "+", *num(rounded), "=", *num(a + rounded), ";",
                  *num(a + rounded), "-", *num(rounded - b), "=", *num(a + b), ";"]
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        return y + ["ans", *num(a + b)]

    def answer(self, x):
        return x[0] + x[1]

    def read_answer(self, tokens):
        return read_int(tokens)

    def feature(self, x):
        return x[0] // 10 ** (self.n_digits - 1) % 3


TASKS = {cls.name: cls for cls in (ListSummation, SortingAlgorithms, GridPathfinding,
                                   LinearEquationSolving, BaseConversion, MultidigitAddition)}
ALIASES = {cls.alias: name for name, cls in TASKS.items()}


def canonical_name(name):
    """A canonical task name or alias -> the canonical name; ValueError naming the valid ones."""
    if name in TASKS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    valid = ", ".join(f"{n} ({cls.alias})" for n, cls in TASKS.items())
    raise ValueError(f"unknown task {name!r}; valid tasks: {valid}")


def get_task(name, **options):
    """A task object by canonical name or alias, e.g. get_task('grid', mixture='input-dependent')."""
    return TASKS[canonical_name(name)](**options)


def integer_options(cls):
    """A task class's integer knobs and their defaults."""
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if isinstance(p.default, int) and not isinstance(p.default, bool)}


def parse_task_options(name, text):
    """'n_digits=2' -> {'n_digits': 2}: the task's integer knobs, checked against its signature."""
    cls = TASKS[canonical_name(name)]
    knobs, options = integer_options(cls), {}
    for item in filter(None, text.split(",")):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in knobs:
            raise ValueError(f"{cls.name} has no integer option {key!r}; its options: "
                             + ", ".join(f"{k}={v}" for k, v in knobs.items()))
        if key in options:
            raise ValueError(f"task option {key} is given twice")
        if not value.isdigit() or not 1 <= int(value) <= 10 ** 6:
            raise ValueError(f"task option {key} must be an integer in 1..10^6, got {value!r}")
        options[key] = int(value)
    return options


def check_task(task, draws=200, seed=0):
    """Draw inputs from both splits and return the longest record (tokens): a ValueError naming
    the options when they leave a split empty or an input range empty."""
    rng, longest = random.Random(seed), 0
    try:
        for split in ("train", "test"):
            for _ in range(draws):
                x, _, y = task.sample(rng, split)
                longest = max(longest, len(record_tokens(task.input_tokens(x), y)))
    except ValueError as e:
        if "empty range" not in str(e):
            raise
        raise ValueError(f"{task.name}: its options ({task_options_text(task)}) leave an empty range "
                         f"to draw inputs from") from None
    return longest


# ----------------------------------------------------------------------------------------------
# Statistics: record lengths, ambiguity, where strategies part ways, generation speed


def divergence_index(a, b):
    """Index of the first position where two token lists differ (the shorter length if a prefix)."""
    for i, (s, t) in enumerate(zip(a, b)):
        if s != t:
            return i
    return min(len(a), len(b))


def task_statistics(task, n=2000, seed=0):
    rng = random.Random(seed)
    lengths, ambiguous, depths = [], 0, []
    for _ in range(n):
        x = task.sample_input(rng)
        traces = list(task.traces(x).values())
        lengths += [len(record_tokens(task.input_tokens(x), t)) for t in traces]
        ambiguous += len({tuple(t) for t in traces}) < len(traces)
        depths += [divergence_index(traces[i], traces[j])
                   for i in range(len(traces)) for j in range(i + 1, len(traces))]
    start = time.perf_counter()
    for _ in range(10_000):
        x, _, y = task.sample(rng)
        encode(record_tokens(task.input_tokens(x), y))
    return {"max_len": max(lengths), "mean_len": sum(lengths) / len(lengths),
            "ambiguity_rate": ambiguous / n, "divergence_depth": sum(depths) / len(depths),
            "seconds_per_10k_records": time.perf_counter() - start}


def main():
    rng = random.Random(0)
    for name in TASKS:
        task = get_task(name)
        x = task.sample_input(rng)
        print(f"\n{name} ({task.alias})  x: {' '.join(task.input_tokens(x))}")
        for s in task.strategies:
            print(f"  {s:24s} {' '.join(task.trace(x, s))}")
        stats = task_statistics(task)
        print("  " + "  ".join(f"{k}={v:.3g}" for k, v in stats.items()))


if __name__ == "__main__":
    sys.exit(main())
