"""cupyflash.flash_attn_compat on the CPU: flash_attn 2's signatures, and every argument passed to
the right place of cupyflash.attention / attention_varlen / attention_with_kvcache.

Those three are replaced by recorders that bind each call to the documented signature
(written out below, and checked against the real functions), so a wrong name, a misplaced
positional argument or a dropped keyword fails the bind or the comparison. No GPU, no kernels.
The expected signatures are flash_attn 2.8's (flash_attn/flash_attn_interface.py in
Dao-AILab/flash-attention), written out by hand.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
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
FLASH_ATTN_WITH_KVCACHE = [("q", EMPTY), ("k_cache", EMPTY), ("v_cache", EMPTY), ("k", None), ("v", None),
                           ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
                           ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
                           ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
                           ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
                           ("return_softmax_lse", False)]


# The api's signatures as documented; the recorders bind calls to them.
def attention_contract(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                       alibi_slopes=None, dropout_p=0.0, seed=None, return_lse=False): ...


def attention_varlen_contract(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                              softmax_scale=None, window_size=(-1, -1), seqused_k=None, softcap=0.0,
                              alibi_slopes=None, dropout_p=0.0, seed=None, return_lse=False, check=False): ...


def attention_with_kvcache_contract(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                                    cache_batch_idx=None, causal=True, softmax_scale=None, window_size=(-1, -1),
                                    num_splits=0, split_size=None, return_lse=False, check=False): ...


# Stand-ins: the wrappers must pass them on untouched (identity, not equality, is compared).
Q, K, V, CU_Q, CU_K, OUT, LSE, SLOPES, TABLE = (object() for _ in range(9))
ATTENTION_DEFAULTS = dict(causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          dropout_p=0.0, seed=None, return_lse=False)
VARLEN_DEFAULTS = dict(ATTENTION_DEFAULTS, seqused_k=None, check=False)
# Caches carry a shape: flash_attn's cache_seqlens=None is read from it. Contiguous (batch_cache 3,
# seqlen_cache 40, heads_kv 2, head_dim 64); paged (12 pages of 16 keys) with 5 pages per sequence.
K_CACHE, V_CACHE = (types.SimpleNamespace(shape=(3, 40, 2, 64)) for _ in range(2))
K_PAGES, V_PAGES = (types.SimpleNamespace(shape=(12, 16, 2, 64)) for _ in range(2))
PAGE_TABLE = types.SimpleNamespace(shape=(2, 5))
SEQLENS, BATCH_IDX, ROTARY, LEFTPAD = (object() for _ in range(4))
# causal=False is flash_attn's default; the contract's is True, so a recorded False was passed on.
KVCACHE_DEFAULTS = dict(k=None, v=None, block_table=None, cache_batch_idx=None, causal=False, softmax_scale=None,
                        window_size=(-1, -1), num_splits=0, split_size=None, return_lse=False, check=False)
KVCACHE_LANDED = importlib.util.find_spec("cupyflash.kvcache") is not None
needs_kvcache = pytest.mark.skipif(not KVCACHE_LANDED, reason="cupyflash/kvcache.py is not in this tree yet")


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


@pytest.fixture
def decode(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder(attention_with_kvcache_contract)
    monkeypatch.setattr(kvcache_module(monkeypatch), "attention_with_kvcache", recorder, raising=KVCACHE_LANDED)
    return recorder


def kvcache_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """cupyflash.kvcache; on a tree without it yet, an empty module standing in its place for the
    test (in sys.modules and on the package, both undone afterwards). The stand-in goes once
    kvcache.py is in."""
    if KVCACHE_LANDED:
        return importlib.import_module("cupyflash.kvcache")
    stand_in = types.ModuleType("cupyflash.kvcache")
    monkeypatch.setitem(sys.modules, "cupyflash.kvcache", stand_in)
    monkeypatch.setattr(cupyflash, "kvcache", stand_in, raising=False)
    return stand_in


def parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any, type]]:
    """(name, kind, default, type of the default) per parameter: 0 and 0.0 differ here."""
    return [(p.name, p.kind, p.default, type(p.default)) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("function, expected", [(compat.flash_attn_func, FLASH_ATTN_FUNC),
                                                (compat.flash_attn_varlen_func, FLASH_ATTN_VARLEN_FUNC),
                                                (compat.flash_attn_with_kvcache, FLASH_ATTN_WITH_KVCACHE)],
                         ids=["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"])
def test_signature_is_flash_attn_2s(function: Callable[..., Any], expected: list[tuple[str, Any]]) -> None:
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert parameters(function) == [(name, positional, default, type(default)) for name, default in expected]


@pytest.mark.parametrize("name, contract", [("attention", attention_contract),
                                            ("attention_varlen", attention_varlen_contract)])
def test_recorders_model_the_real_api(name: str, contract: Callable[..., Any]) -> None:
    """The recorders are only as good as the contract they bind to: it must be the api's."""
    assert parameters(getattr(api, name)) == parameters(contract)


@needs_kvcache
def test_kvcache_recorder_models_the_real_function() -> None:
    kvcache = importlib.import_module("cupyflash.kvcache")
    assert parameters(kvcache.attention_with_kvcache) == parameters(attention_with_kvcache_contract)


@pytest.mark.skipif(not hasattr(cupyflash, "attention_with_kvcache"),
                    reason="cupyflash/__init__.py does not export the KV-cache functions yet")
def test_kvcache_public_names() -> None:
    kvcache = importlib.import_module("cupyflash.kvcache")
    assert cupyflash.flash_attn_with_kvcache is compat.flash_attn_with_kvcache
    assert cupyflash.attention_with_kvcache is kvcache.attention_with_kvcache
    for name in ("flash_attn_with_kvcache", "attention_with_kvcache"):
        assert name in cupyflash.__all__


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


# --------------------------------------------------------------------------- flash_attn_with_kvcache


def test_kvcache_defaults(decode: Recorder) -> None:
    assert compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, cache_seqlens=SEQLENS) is OUT
    assert decode.only_call() == dict(KVCACHE_DEFAULTS, q=Q, k_cache=K_CACHE, v_cache=V_CACHE, cache_seqlens=SEQLENS)


def test_kvcache_every_keyword_forwarded(decode: Recorder) -> None:
    result = compat.flash_attn_with_kvcache(q=Q, k_cache=K_CACHE, v_cache=V_CACHE, k=K, v=V, rotary_cos=None,
                                            rotary_sin=None, cache_seqlens=SEQLENS, cache_batch_idx=BATCH_IDX,
                                            cache_leftpad=None, block_table=TABLE, softmax_scale=0.37, causal=True,
                                            window_size=(7, 3), softcap=0.0, rotary_interleaved=False,
                                            alibi_slopes=None, num_splits=3, return_softmax_lse=False)
    assert result is OUT
    assert decode.only_call() == dict(KVCACHE_DEFAULTS, q=Q, k_cache=K_CACHE, v_cache=V_CACHE, k=K, v=V,
                                      cache_seqlens=SEQLENS, cache_batch_idx=BATCH_IDX, block_table=TABLE,
                                      softmax_scale=0.37, causal=True, window_size=(7, 3), num_splits=3)


def test_kvcache_all_positional(decode: Recorder) -> None:
    """flash_attn's order: k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
    cache_leftpad, block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved,
    alibi_slopes, num_splits, return_softmax_lse."""
    out, lse = compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, K, V, None, None, SEQLENS, BATCH_IDX, None, TABLE,
                                              0.25, True, (4, 1), 0.0, False, None, 2, True)
    assert (out, lse) == (OUT, LSE)
    assert decode.only_call() == dict(KVCACHE_DEFAULTS, q=Q, k_cache=K_CACHE, v_cache=V_CACHE, k=K, v=V,
                                      cache_seqlens=SEQLENS, cache_batch_idx=BATCH_IDX, block_table=TABLE,
                                      softmax_scale=0.25, causal=True, window_size=(4, 1), num_splits=2,
                                      return_lse=True)


def test_kvcache_sixth_positional_argument_is_rotary_cos(decode: Recorder) -> None:
    """cache_seqlens is the eighth argument: passed sixth it lands on rotary_cos and is refused,
    never taken for the lengths."""
    with pytest.raises(NotImplementedError, match=r"rotary_cos \(not None\)"):
        compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, K, V, SEQLENS)
    assert decode.calls == []


@pytest.mark.parametrize("flag", [True, np.bool_(True)], ids=["bool", "numpy-bool"])
def test_kvcache_return_softmax_lse(decode: Recorder, flag: Any) -> None:
    result = compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, cache_seqlens=SEQLENS, return_softmax_lse=flag)
    assert isinstance(result, tuple) and len(result) == 2
    assert result[0] is OUT and result[1] is LSE
    assert decode.only_call()["return_lse"] is True  # a plain bool


KVCACHE_UNSUPPORTED = [pytest.param("rotary_cos", ROTARY, id="rotary_cos"),
                       pytest.param("rotary_sin", ROTARY, id="rotary_sin"),
                       pytest.param("cache_leftpad", LEFTPAD, id="cache_leftpad"),
                       pytest.param("alibi_slopes", SLOPES, id="alibi_slopes"),
                       pytest.param("softcap", 30.0, id="softcap"), pytest.param("softcap", 1, id="softcap-int"),
                       pytest.param("softcap", np.float32(5.0), id="softcap-numpy")]


@pytest.mark.parametrize("name, value", KVCACHE_UNSUPPORTED)
def test_kvcache_unsupported_raises_naming_it(decode: Recorder, name: str, value: Any) -> None:
    with pytest.raises(NotImplementedError, match=rf"flash_attn_with_kvcache: {name}\b"):
        compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, K, V, cache_seqlens=SEQLENS, **{name: value})
    assert decode.calls == []  # refused before attention_with_kvcache (and so any GPU work)


def test_kvcache_every_unsupported_argument_is_named_at_once(decode: Recorder) -> None:
    with pytest.raises(NotImplementedError) as raised:
        compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, K, V, ROTARY, ROTARY, SEQLENS, cache_leftpad=LEFTPAD,
                                       softcap=2.5, alibi_slopes=SLOPES)
    for name in ("rotary_cos", "rotary_sin", "cache_leftpad", "softcap=2.5", "alibi_slopes"):
        assert name in str(raised.value)
    assert "rotate q and the new k" in str(raised.value)
    assert decode.calls == []


@pytest.mark.parametrize("softcap", [0, 0.0, -1.0, float("nan")], ids=["int-0", "0.0", "negative", "nan"])
def test_kvcache_softcap_not_above_zero_is_off(decode: Recorder, softcap: float) -> None:
    """As in flash_attn, where only softcap > 0 turns it on; attention_with_kvcache has no softcap."""
    assert compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, cache_seqlens=SEQLENS, softcap=softcap) is OUT
    assert decode.only_call() == dict(KVCACHE_DEFAULTS, q=Q, k_cache=K_CACHE, v_cache=V_CACHE, cache_seqlens=SEQLENS)


@pytest.mark.parametrize("softcap", ["30", None], ids=["str", "None"])
def test_kvcache_softcap_must_be_a_number(decode: Recorder, softcap: Any) -> None:
    with pytest.raises(TypeError, match=r"softcap must be a real number"):
        compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, cache_seqlens=SEQLENS, softcap=softcap)
    assert decode.calls == []


@pytest.mark.parametrize("flag, value", [("rotary_interleaved", "no"), ("rotary_interleaved", 1),
                                         ("return_softmax_lse", 1), ("return_softmax_lse", None)],
                         ids=["rotary_interleaved-str", "rotary_interleaved-int", "return_softmax_lse-int",
                              "return_softmax_lse-None"])
def test_kvcache_flags_must_be_bools(decode: Recorder, flag: str, value: Any) -> None:
    with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
        compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, cache_seqlens=SEQLENS, **{flag: value})
    assert decode.calls == []


@pytest.mark.parametrize("cache_seqlens", [SEQLENS, 7, 0], ids=["device-array", "int", "int-0"])
def test_kvcache_cache_seqlens_passed_on_as_given(decode: Recorder, cache_seqlens: Any) -> None:
    compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, cache_seqlens=cache_seqlens)
    assert decode.only_call()["cache_seqlens"] is cache_seqlens


def test_kvcache_no_cache_seqlens_means_the_whole_contiguous_cache(decode: Recorder) -> None:
    """flash_attn's cache_seqlens=None: every sequence attends to all seqlen_cache keys of its slot."""
    compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, cache_batch_idx=BATCH_IDX)
    call = decode.only_call()
    assert call["cache_seqlens"] == 40 and type(call["cache_seqlens"]) is int
    assert call["cache_batch_idx"] is BATCH_IDX


def test_kvcache_no_cache_seqlens_means_every_page_of_the_table(decode: Recorder) -> None:
    """Paged: each sequence's max_pages (5) pages of page_size (16) keys."""
    compat.flash_attn_with_kvcache(Q, K_PAGES, V_PAGES, block_table=PAGE_TABLE)
    call = decode.only_call()
    assert call["cache_seqlens"] == 5 * 16 and call["block_table"] is PAGE_TABLE


@pytest.mark.parametrize("new", [dict(k=K, v=V), dict(k=K), dict(v=V)], ids=["k-and-v", "k", "v"])
def test_kvcache_append_needs_cache_seqlens(decode: Recorder, new: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"cache_seqlens=None"):
        compat.flash_attn_with_kvcache(Q, K_CACHE, V_CACHE, **new)
    assert decode.calls == []


@pytest.mark.parametrize("k_cache, block_table, error, message", [
    pytest.param(object(), None, TypeError, r"k_cache must be an array", id="k_cache-no-shape"),
    pytest.param(types.SimpleNamespace(shape=(40, 2, 64)), None, ValueError,
                 r"k_cache.shape is \(40, 2, 64\); k_cache must be 4-D", id="k_cache-3d"),
    pytest.param(K_PAGES, types.SimpleNamespace(shape=(10,)), ValueError,
                 r"block_table.shape is \(10,\); block_table must be 2-D", id="block_table-1d")])
def test_kvcache_whole_cache_needs_readable_shapes(decode: Recorder, k_cache: Any, block_table: Any,
                                                   error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        compat.flash_attn_with_kvcache(Q, k_cache, V_CACHE, block_table=block_table)
    assert decode.calls == []
