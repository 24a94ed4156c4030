"""timing.do_bench_interleaved on a stand-in for CuPy: which call runs when, and whose time is whose."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cupyflash import timing


class _Clock:
    """CuPy's events on a fake clock that each call advances by its own cost."""

    def __init__(self) -> None:
        self.now = 0.0
        self.flushes = 0
        self.log: list[str] = []  # what reached the stream, in order: busy waits and timed calls

    def cupy(self) -> Any:
        clock = self

        class Event:
            def record(self, stream: Any) -> None:
                self.at = clock.now

            def synchronize(self) -> None:
                pass

        class Buffer:
            def fill(self, value: int) -> None:
                clock.flushes += 1

        class Module:
            def __init__(self, code: str) -> None:
                assert "busy_wait" in code

            def get_function(self, name: str) -> Any:
                def launch(grid: tuple, block: tuple, args: tuple, stream: Any = None) -> None:
                    clock.log.append(f"wait {int(args[0])}")
                return launch

        stream = SimpleNamespace(synchronize=lambda: None)
        cuda = SimpleNamespace(Event=Event, get_current_stream=lambda: stream,
                               get_elapsed_time=lambda start, end: end.at - start.at,
                               runtime=SimpleNamespace(getDevice=lambda: 99))
        return SimpleNamespace(cuda=cuda, int32="int32", empty=lambda n, dtype: Buffer(), RawModule=Module,
                               uint64=int)


def test_interleaved_rounds_rotate_and_keep_each_calls_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(timing, "require_cupy", clock.cupy)
    monkeypatch.setattr(timing, "_flush_buffers", {})
    monkeypatch.setattr(timing, "_busy_wait_kernels", {})
    calls: list[str] = []

    def call(name: str, cost: float) -> Any:
        def fn() -> None:
            calls.append(name)
            clock.log.append(name)
            clock.now += cost
        return fn

    results = timing.do_bench_interleaved([call("a", 1.0), call("b", 3.0), call("c", 5.0)], warmup=2, runs=4)
    wait = f"wait {timing.HOST_SLACK_US * 1000}"
    assert clock.log[6:12] == [wait, "a", wait, "b", wait, "c"]  # the GPU busy before every timed call only
    assert calls[:6] == ["a", "b", "c"] * 2  # warm-up
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # each round starts one later
    assert [(t.median_ms, t.min_ms, t.max_ms, t.runs) for t in results] == [(1.0, 1.0, 1.0, 4), (3.0, 3.0, 3.0, 4),
                                                                          (5.0, 5.0, 5.0, 4)]
    assert clock.flushes == 12  # before every timed call


def test_do_bench_is_the_one_call_case(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(timing, "require_cupy", clock.cupy)
    monkeypatch.setattr(timing, "_flush_buffers", {})
    costs = iter([9.0, 9.0, 2.0, 4.0, 6.0])  # two warm-up calls, then three timed ones

    def fn() -> None:
        clock.now += next(costs)

    result = timing.do_bench(fn, warmup=2, runs=3, flush_l2=False, hide_host=False)
    assert (result.median_ms, result.min_ms, result.max_ms, result.runs) == (4.0, 2.0, 6.0, 3)
    assert clock.flushes == 0 and clock.log == []
