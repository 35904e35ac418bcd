"""tasks.py: traces are real executions with the right answers, validation and likelihood are exact."""

import collections
import math
import random
from fractions import Fraction

import pytest

from tasks import (ALIASES, TASKS, VOCAB, Task, check_task, decode, encode, get_task, parse_task_options,
                   record_tokens)

N_INPUTS = 2000


def independent_answer_ok(name, x, answer):
    """The final answer checked with Python's own tools, never with the task's solver."""
    if name == "list_summation":
        return answer == sum(x)
    if name == "sorting_algorithms":
        return answer == sorted(x)
    if name == "grid_pathfinding":  # cells one apart, each a move down or right, from S to G
        cells = [(x[0], x[1])] + [(row, col) for _, row, col in answer]
        steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(cells, cells[1:])]
        return (cells[-1] == (x[2], x[3]) and all(step in ((1, 0), (0, 1)) for step in steps)
                and [move for move, _, _ in answer] == ["D" if step == (1, 0) else "R" for step in steps])
    if name == "linear_equation_solving":
        a, b, c, d = x
        v = Fraction(d - b, a - c)
        return v.denominator == 1 and answer == v and a * answer + b == c * answer + d
    if name == "base_conversion":
        n, target = x
        return int(answer, target) == n
    if name == "multidigit_addition":
        return answer == x[0] + x[1]
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_trace_parses_is_correct_and_attributed(name):
    task, rng = get_task(name), random.Random(1)
    for _ in range(N_INPUTS):
        x = task.sample_input(rng)
        traces = task.traces(x)
        for s, y in traces.items():
            check = task.check(x, y)
            assert check.parsed and check.correct, (name, s, x, y)
            same = {t for t, other in traces.items() if other == y}
            assert check.strategies == same and s in check.strategies
            assert independent_answer_ok(name, x, task.parse_answer(y)), (name, s, x, y)


@pytest.mark.parametrize("name", list(TASKS))
def test_one_token_corruption_is_never_a_correct_trace_of_that_strategy(name):
    task, rng = get_task(name), random.Random(2)
    vocab = [t for t in VOCAB if not t.startswith("<")]
    for _ in range(300):
        x = task.sample_input(rng)
        s = rng.choice(task.strategies)
        y = task.trace(x, s)
        i = rng.randrange(len(y))
        corrupted = list(y)
        corrupted[i] = rng.choice([t for t in vocab if t != y[i]])
        check = task.check(x, corrupted)
        assert not (check.correct and s in check.strategies)


@pytest.mark.parametrize("mixture", ["uniform", "input-dependent"])
@pytest.mark.parametrize("name", list(TASKS))
def test_log_prob_is_a_distribution_over_traces_and_branch_targets_factor_it(name, mixture):
    task, rng = get_task(name, mixture=mixture), random.Random(3)
    for _ in range(200):
        x = task.sample_input(rng)
        distinct = {tuple(t) for t in task.traces(x).values()}
        assert math.isclose(sum(math.exp(task.log_prob(x, list(t))) for t in distinct), 1.0, rel_tol=1e-9)
        assert task.log_prob(x, ["ans", "1"]) == -math.inf
        probs = task.strategy_probs(x)
        assert math.isclose(sum(probs.values()), 1.0)
        if mixture == "input-dependent":  # the favoured strategy is a visible function of x
            assert probs[task.strategies[task.feature(x)]] == 0.7
        for y in map(list, distinct):  # p*(y|x) is the product of p*(y_t | x, y_<t) where x's traces part
            branches = task.branch_targets(x, y)
            assert all(math.isclose(sum(p.values()), 1.0) and len(p) > 1 for p in branches.values())
            chain = sum(math.log(branches[t][token]) for t, token in enumerate(y + ["</y>"]) if t in branches)
            assert math.isclose(chain, task.log_prob(x, y), abs_tol=1e-9)
    with pytest.raises(ValueError, match="is not a trace"):
        task.branch_targets(x, ["ans", "1"])


@pytest.mark.parametrize("name", list(TASKS))
def test_validators_never_raise_on_garbage(name):
    task, rng = get_task(name), random.Random(4)
    for _ in range(10_000):
        x = task.sample_input(rng)
        y = [rng.choice(VOCAB) for _ in range(rng.randrange(0, 12))]
        if rng.random() < 0.5:  # garbage that does end in an 'ans' section
            y += ["ans"] + [rng.choice(VOCAB) for _ in range(rng.randrange(0, 4))]
        check = task.check(x, y)
        assert isinstance(check.parsed, bool) and isinstance(check.correct, bool)
        task.parse_answer(y)
        task.log_prob(x, y)


@pytest.mark.parametrize("name", list(TASKS))
def test_records_fit_and_strategies_differ(name):
    task, rng = get_task(name), random.Random(5)
    ambiguous = 0
    for _ in range(N_INPUTS):
        x = task.sample_input(rng)
        traces = list(task.traces(x).values())
        assert max(len(record_tokens(task.input_tokens(x), t)) for t in traces) <= 131  # 128 + the z slot
        ambiguous += len({tuple(t) for t in traces}) < len(traces)
    assert ambiguous / N_INPUTS < 0.05


def test_worked_example_grid():
    """From (1, 2) to (3, 4): two moves right and two down under each strategy; the steps are the answer."""
    task = get_task("grid")
    assert " ".join(task.trace((1, 2, 3, 4), "alternating")) == "R 1 3 ; D 2 3 ; R 2 4 ; D 3 4 ; ans"
    down_first = task.trace((1, 2, 3, 4), "down-first")
    assert task.parse_answer(down_first) == [("D", 2, 2), ("D", 3, 2), ("R", 3, 3), ("R", 3, 4)]
    assert task.check((1, 2, 3, 4), down_first).correct
    assert not task.check((1, 2, 3, 4), ["D", "2", "2", ";", "D", "3", "2", ";", "R", "3", "4", ";", "ans"]).correct
    assert not task.check((1, 2, 3, 4), down_first[:-5] + ["ans"]).correct  # stops before G
    assert task.parse_answer(down_first + ["R"]) is None


def test_grid_draws_every_input_equally_often():
    """The longest path, (0,0) to (9,9), is as frequent as the shortest ones (1/1296 each)."""
    task, rng = get_task("grid"), random.Random(0)
    counts = collections.Counter(task.sample_input(rng) for _ in range(64_800))
    assert len(counts) == 1296  # every start and goal at least min_steps apart on both axes
    assert 25 < counts[(0, 0, 9, 9)] < 80 and 25 < counts[(7, 7, 9, 9)] < 80  # 50 expected


def test_worked_example_sum_numbers_have_one_width():
    """Every number has the largest sum's two digits, so every step of a trace is 8 tokens before its `;`."""
    task = get_task("sum")
    assert " ".join(task.input_tokens([7, 3, 9, 1, 5])) == "0 7 + 0 3 + 0 9 + 0 1 + 0 5"
    y = " ".join(task.trace([7, 3, 9, 1, 5], "pairwise"))
    assert y == "0 7 + 0 3 = 1 0 ; 0 9 + 0 1 = 1 0 ; 1 0 + 1 0 = 2 0 ; 2 0 + 0 5 = 2 5 ; ans 2 5"
    assert {len(step.split()) for step in y.split(" ; ")[:-1]} == {8}


def test_worked_example_base_numbers_have_one_width():
    """Every decimal number has max_value's three digits, so every division step is 5 tokens before its `;`."""
    task = get_task("base")
    assert " ".join(task.input_tokens((38, 4))) == "0 3 8 to 4"
    y = " ".join(task.trace((38, 4), "repeated-division"))
    assert y == "0 0 9 r 2 ; 0 0 2 r 1 ; 0 0 0 r 2 ; ans 2 1 2"
    halvings = " ".join(task.trace((38, 4), "via-binary")).split(" ; ")[:6]
    assert {len(step.split()) for step in halvings} == {5}
    assert task.parse_answer(task.trace((38, 4), "decomposition")) == "212"
    assert " ".join(task.trace((168, 8), "decomposition")).startswith("2 * 0 6 4 = 1 2 8 r 0 4 0 ;")


def test_worked_example_addition_opens_each_strategy_with_its_own_kind_of_token():
    """The carry comes first, so a 0 opens right-to-left-carry and nothing else: the column a trace opened
    follows from its strategy, not from matching a digit against x (88 + 23 opens 8 in two strategies)."""
    task, rng = get_task("add", n_digits=2), random.Random(0)
    assert " ".join(task.trace((85, 23), "right-to-left-carry")) == "0 + 5 + 3 = 8 ; 0 + 8 + 2 = 1 0 ; ans 1 0 8"
    for x in [task.sample_input(rng) for _ in range(200)] + [(88, 23)]:
        first = {s: task.trace(x, s)[0] for s in task.strategies}
        assert first["right-to-left-carry"] == "0"
        assert first["left-to-right-partials"] != "0" and first["rounding-decomposition"] != "0"


def test_worked_example_sorting_states_are_real():
    """Bubble sort on 3 1 4 0 2 5: pass 1 bubbles 4 past 0 and 2, giving 1 3 0 2 4 5."""
    y = get_task("sort").trace([3, 1, 4, 0, 2, 5], "bubble-sort")
    assert y[:6] == ["1", "3", "0", "2", "4", "5"]


def test_encode_decode_round_trip_and_errors():
    tokens = record_tokens(["3", "+", "4"], ["3", "+", "4", "=", "7", ";", "ans", "7"])
    assert decode(encode(tokens)) == tokens
    with pytest.raises(ValueError, match="unknown token"):
        encode(["banana"])


def test_get_task_aliases_and_unknown_name():
    for alias, name in ALIASES.items():
        assert get_task(alias).name == name and isinstance(get_task(name), Task)
    with pytest.raises(ValueError) as e:
        get_task("chess")
    for name, cls in TASKS.items():
        assert name in str(e.value) and cls.alias in str(e.value)


def test_task_options_are_the_tasks_integer_knobs():
    assert parse_task_options("add", "n_digits=2") == {"n_digits": 2}
    assert parse_task_options("grid", "size=5, min_steps=3") == {"size": 5, "min_steps": 3}
    assert parse_task_options("sum", "") == {}
    with pytest.raises(ValueError, match="no integer option 'target_bases'"):
        parse_task_options("base", "target_bases=4")  # a tuple, not an integer knob
    for bad in ("n_digits=0", "n_digits=two", "n_digits", "n_digits=9999999"):
        with pytest.raises(ValueError, match="must be an integer in 1..10"):
            parse_task_options("add", bad)
    with pytest.raises(ValueError, match="given twice"):
        parse_task_options("add", "n_digits=2,n_digits=3")


def test_empty_or_degenerate_options_fail_fast_naming_them():
    with pytest.raises(ValueError, match=r"no train input in 10000 draws; its options \(n=5, max_value=1\)"):
        check_task(get_task("sum", max_value=1))
    with pytest.raises(ValueError, match=r"options \(max_coef=1, max_value=9\) leave an empty range"):
        check_task(get_task("linear", max_coef=1))
    assert 40 < check_task(get_task("grid")) <= 160  # the longest record drawn, in tokens
    task, rng = get_task("add", n_digits=2), random.Random(0)
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in (task.sample_input(rng) for _ in range(50)))
