"""cupyflash.flash_attn_compat on the CPU: flash_attn 2's signatures, and every argument passed to
the right place of cupyflash.attention / attention_varlen.

Those two are replaced by recorders that bind each call to the api's documented signature
(written out below, and checked against the real functions), so a wrong name, a misplaced
positional argument or a dropped keyword fails the bind or the comparison. No GPU, no kernels.
The expected signatures are flash_attn 2.8's (flash_attn/flash_attn_interface.py in
Dao-AILab/flash-attention), written out by hand.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import pytest

import cupyflash
from cupyflash import api
from cupyflash import flash_attn_compat as compat

EMPTY = inspect.Parameter.empty
# flash_attn 2's parameters in order, with their defaults (EMPTY: required). Every parameter is
# positional-or-keyword there: flash_attn_func(q, k, v, 0.1) means dropout_p=0.1.
FLASH_ATTN_FUNC = [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("dropout_p", 0.0), ("softmax_scale", None),
                   ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
                   ("deterministic", False), ("return_attn_probs", False)]
FLASH_ATTN_VARLEN_FUNC = [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("cu_seqlens_q", EMPTY), ("cu_seqlens_k", EMPTY),
                          ("max_seqlen_q", EMPTY), ("max_seqlen_k", EMPTY), ("dropout_p", 0.0),
                          ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
                          ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False),
                          ("block_table", None)]


# The api's signatures as documented; the recorders bind calls to them.
def attention_contract(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None, dropout_p=0.0, seed=None, return_lse=False): ...


def attention_varlen_contract(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                              softmax_scale=None, window_size=(-1, -1), seqused_k=None, softcap=0.0,
                              alibi_slopes=None, dropout_p=0.0, seed=None, return_lse=False, check=False): ...


# Stand-ins: the wrappers must pass them on untouched (identity, not equality, is compared).
Q, K, V, CU_Q, CU_K, OUT, LSE, SLOPES, TABLE = (object() for _ in range(9))
ATTENTION_DEFAULTS = dict(causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          dropout_p=0.0, seed=None, return_lse=False)
VARLEN_DEFAULTS = dict(ATTENTION_DEFAULTS, seqused_k=None, check=False)


class Recorder:
    """Stands in for an api function: binds every call to `contract` (TypeError if the call does
    not fit it), keeps the bound arguments with defaults filled in, returns OUT or (OUT, LSE)."""

    def __init__(self, contract: Callable[..., Any]) -> None:
        self.signature = inspect.signature(contract)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self.calls.append(dict(bound.arguments))
        return (OUT, LSE) if bound.arguments["return_lse"] else OUT

    def only_call(self) -> dict[str, Any]:
        assert len(self.calls) == 1, f"expected one call, got {len(self.calls)}: {self.calls}"
        return self.calls[0]


@pytest.fixture
def dense(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder(attention_contract)
    monkeypatch.setattr(api, "attention", recorder)
    return recorder


@pytest.fixture
def varlen(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder(attention_varlen_contract)
    monkeypatch.setattr(api, "attention_varlen", recorder)
    return recorder


def parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any, type]]:
    """(name, kind, default, type of the default) per parameter: 0 and 0.0 differ here."""
    return [(p.name, p.kind, p.default, type(p.default)) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("function, expected", [(compat.flash_attn_func, FLASH_ATTN_FUNC),
                                                (compat.flash_attn_varlen_func, FLASH_ATTN_VARLEN_FUNC)],
                         ids=["flash_attn_func", "flash_attn_varlen_func"])
def test_signature_is_flash_attn_2s(function: Callable[..., Any], expected: list[tuple[str, Any]]) -> None:
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert parameters(function) == [(name, positional, default, type(default)) for name, default in expected]


@pytest.mark.parametrize("name, contract", [("attention", attention_contract),
                                            ("attention_varlen", attention_varlen_contract)])
def test_recorders_model_the_real_api(name: str, contract: Callable[..., Any]) -> None:
    """The recorders are only as good as the contract they bind to: it must be the api's."""
    assert parameters(getattr(api, name)) == parameters(contract)


def test_public_names() -> None:
    assert cupyflash.flash_attn_func is compat.flash_attn_func
    assert cupyflash.flash_attn_varlen_func is compat.flash_attn_varlen_func
    assert cupyflash.attention_varlen is api.attention_varlen
    assert cupyflash.attention_varlen_backward is api.attention_varlen_backward
    for name in ("flash_attn_func", "flash_attn_varlen_func", "attention_varlen", "attention_varlen_backward"):
        assert name in cupyflash.__all__


def test_dense_defaults(dense: Recorder) -> None:
    assert compat.flash_attn_func(Q, K, V) is OUT
    assert dense.only_call() == dict(ATTENTION_DEFAULTS, q=Q, k=K, v=V)


def test_dense_every_keyword_forwarded(dense: Recorder) -> None:
    result = compat.flash_attn_func(Q, K, V, dropout_p=0.0, softmax_scale=0.37, causal=True, window_size=(7, 3),
                                    softcap=0.0, alibi_slopes=None, deterministic=True, return_attn_probs=False)
    assert result is OUT
    assert dense.only_call() == dict(ATTENTION_DEFAULTS, q=Q, k=K, v=V, softmax_scale=0.37, causal=True,
                                     window_size=(7, 3))


def test_dense_all_positional(dense: Recorder) -> None:
    """flash_attn's order: dropout_p fourth, then softmax_scale, causal, window_size, softcap,
    alibi_slopes, deterministic, return_attn_probs."""
    out, lse, probs = compat.flash_attn_func(Q, K, V, 0.0, 0.25, True, (4, 1), 0.0, None, False, True)
    assert (out, lse, probs) == (OUT, LSE, None)
    assert dense.only_call() == dict(ATTENTION_DEFAULTS, q=Q, k=K, v=V, softmax_scale=0.25, causal=True,
                                     window_size=(4, 1), return_lse=True)


def test_dense_positional_dropout_p_is_the_fourth_argument(dense: Recorder) -> None:
    with pytest.raises(NotImplementedError, match=r"dropout_p=0\.1"):
        compat.flash_attn_func(Q, K, V, 0.1)
    assert dense.calls == []


def test_dense_return_attn_probs(dense: Recorder) -> None:
    result = compat.flash_attn_func(Q, K, V, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3
    assert result[0] is OUT and result[1] is LSE and result[2] is None
    assert dense.only_call()["return_lse"] is True


def test_varlen_defaults(varlen: Recorder) -> None:
    assert compat.flash_attn_varlen_func(Q, K, V, CU_Q, CU_K, 5, 9) is OUT
    assert varlen.only_call() == dict(VARLEN_DEFAULTS, q=Q, k=K, v=V, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K,
                                      max_seqlen_q=5, max_seqlen_k=9)


def test_varlen_every_keyword_forwarded(varlen: Recorder) -> None:
    result = compat.flash_attn_varlen_func(q=Q, k=K, v=V, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K, max_seqlen_q=5,
                                           max_seqlen_k=9, dropout_p=0.0, softmax_scale=0.37, causal=True,
                                           window_size=(7, 3), softcap=0.0, alibi_slopes=None, deterministic=True,
                                           return_attn_probs=False, block_table=None)
    assert result is OUT
    assert varlen.only_call() == dict(VARLEN_DEFAULTS, q=Q, k=K, v=V, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K,
                                      max_seqlen_q=5, max_seqlen_k=9, softmax_scale=0.37, causal=True,
                                      window_size=(7, 3))


def test_varlen_all_positional(varlen: Recorder) -> None:
    out, lse, probs = compat.flash_attn_varlen_func(Q, K, V, CU_Q, CU_K, 5, 9, 0.0, 0.25, True, (4, 1), 0.0, None,
                                                    False, True, None)
    assert (out, lse, probs) == (OUT, LSE, None)
    assert varlen.only_call() == dict(VARLEN_DEFAULTS, q=Q, k=K, v=V, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K,
                                      max_seqlen_q=5, max_seqlen_k=9, softmax_scale=0.25, causal=True,
                                      window_size=(4, 1), return_lse=True)


def test_varlen_positional_dropout_p_is_the_eighth_argument(varlen: Recorder) -> None:
    with pytest.raises(NotImplementedError, match=r"dropout_p=0\.1"):
        compat.flash_attn_varlen_func(Q, K, V, CU_Q, CU_K, 5, 9, 0.1)
    assert varlen.calls == []


def test_varlen_return_attn_probs(varlen: Recorder) -> None:
    result = compat.flash_attn_varlen_func(Q, K, V, CU_Q, CU_K, 5, 9, return_attn_probs=True)
    assert isinstance(result, tuple) and len(result) == 3
    assert result[0] is OUT and result[1] is LSE and result[2] is None
    assert varlen.only_call()["return_lse"] is True


UNSUPPORTED = [pytest.param("dropout_p", 0.1, id="dropout_p"),
               pytest.param("dropout_p", np.float32(0.5), id="dropout_p-numpy"),
               pytest.param("softcap", 30.0, id="softcap"), pytest.param("softcap", 1, id="softcap-int"),
               pytest.param("alibi_slopes", SLOPES, id="alibi_slopes")]


@pytest.mark.parametrize("name, value", UNSUPPORTED)
def test_dense_unsupported_raises_naming_it(dense: Recorder, name: str, value: Any) -> None:
    with pytest.raises(NotImplementedError, match=rf"flash_attn_func: {name}\b"):
        compat.flash_attn_func(Q, K, V, **{name: value})
    assert dense.calls == []  # refused before the api (and so any GPU work) is reached


@pytest.mark.parametrize("name, value", UNSUPPORTED + [pytest.param("block_table", TABLE, id="block_table")])
def test_varlen_unsupported_raises_naming_it(varlen: Recorder, name: str, value: Any) -> None:
    with pytest.raises(NotImplementedError, match=rf"flash_attn_varlen_func: {name}\b"):
        compat.flash_attn_varlen_func(Q, K, V, CU_Q, CU_K, 5, 9, **{name: value})
    assert varlen.calls == []


def test_every_unsupported_argument_is_named_at_once(varlen: Recorder) -> None:
    with pytest.raises(NotImplementedError) as raised:
        compat.flash_attn_varlen_func(Q, K, V, CU_Q, CU_K, 5, 9, dropout_p=0.2, softcap=5.0, alibi_slopes=SLOPES,
                                      block_table=TABLE)
    for name in ("dropout_p=0.2", "softcap=5.0", "alibi_slopes", "block_table"):
        assert name in str(raised.value)
    assert varlen.calls == []


def test_zero_or_invalid_numbers_reach_the_api(dense: Recorder) -> None:
    """0 means off, as in flash_attn; a value that is no number is the api's to reject with its
    own message, so the wrapper passes it on rather than calling it unsupported."""
    compat.flash_attn_func(Q, K, V, dropout_p=0, softcap=0.0)
    compat.flash_attn_func(Q, K, V, dropout_p="0.1")
    assert [call["dropout_p"] for call in dense.calls] == [0, "0.1"]
    assert dense.calls[0]["softcap"] == 0.0


@pytest.mark.parametrize("flag", ["deterministic", "return_attn_probs"])
def test_flags_must_be_bools(dense: Recorder, varlen: Recorder, flag: str) -> None:
    with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
        compat.flash_attn_func(Q, K, V, **{flag: "no"})
    with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
        compat.flash_attn_varlen_func(Q, K, V, CU_Q, CU_K, 5, 9, **{flag: 1})
    assert dense.calls == [] and varlen.calls == []


def test_numpy_bool_flags(dense: Recorder) -> None:
    out, lse, probs = compat.flash_attn_func(Q, K, V, deterministic=np.bool_(True), return_attn_probs=np.bool_(True))
    assert (out, lse, probs) == (OUT, LSE, None)
    assert dense.only_call()["return_lse"] is True  # a plain bool, as the api's plan cache keys want
