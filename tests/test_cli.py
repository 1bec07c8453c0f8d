"""The `entangle-fast` command line: default run and error paths."""
import pytest

from entangle_fast.cli import main


def test_logprobs_of_builtin_pairs(capsys):
    assert main(["logprobs"]) == 0
    out = capsys.readouterr().out
    assert "log p(chosen)" in out and "positive" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3
    for row in rows:  # the last two columns are finite, negative log-probs
        chosen, rejected = map(float, row.split()[-2:])
        assert chosen < 0 and rejected < 0


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_logprobs_other_archs(arch, capsys):
    assert main(["logprobs", "--arch", arch, "--impl", "torch"]) == 0
    assert f"tiny {arch}" in capsys.readouterr().out


def test_unknown_option_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["logprobs", "--arch", "bert"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_logprobs_impl_choices_are_the_backend_switch():
    from entangle_fast._backend import IMPLS
    from entangle_fast.cli import build_parser

    for impl in IMPLS:
        assert build_parser().parse_args(["logprobs", "--impl", impl]).impl == impl
