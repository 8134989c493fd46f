"""A short run of the decoder fuzzer (the note reports a 1M-input run): typed errors only."""

from fedslim.bench import fuzz


def test_short_fuzz_run_finds_only_typed_errors(capsys):
    assert fuzz.main(["--inputs", "3000", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "other exceptions 0" in out and "hangs (> 1 s) 0" in out
