import pytest

from harness.api import MODELS, TASKS, Registry, UnknownNameError, load_plugins

load_plugins()


def test_unknown_name_lists_the_known_ones():
    reg = Registry("widget")
    reg.add("b", "second", object())
    reg.add("a", "first", object())
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; known widgets: a, b"):
        reg.get("c")


def test_duplicate_registration_is_an_error():
    reg = Registry("widget")
    reg.add("a", "first", 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", "again", 2)


def test_plugins_register_the_gpt2_pair_and_core_tasks():
    load_plugins()
    assert {"gpt2-scratch", "gpt2-hf"} <= set(MODELS.names())
    assert {"ppl", "parity"} <= set(TASKS.names())


@pytest.mark.parametrize("name", MODELS.names(), ids=str)
def test_every_reference_named_is_registered_with_the_same_arch(name):
    """`<arch>-scratch` names its `<arch>-hf` reference; ladder models (bigram, rnn, ...) have none."""
    info = MODELS.get(name).info
    assert info.impl in ("scratch", "hf")
    if info.impl == "hf":
        assert info.reference is None
    if info.reference is not None:
        assert info.reference in MODELS
        assert MODELS.get(info.reference).info.arch == info.arch
    if name.endswith("-scratch") and f"{info.arch}-hf" in MODELS:
        assert info.reference == f"{info.arch}-hf"
