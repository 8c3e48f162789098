"""The `kvxfer` command on a CPU: the demo moves a small request and says its bytes are exact."""

from __future__ import annotations

import pytest

from kvxfer import cli

pytestmark = pytest.mark.timeout(120)


def test_demo_moves_exact_bytes_and_every_notification(capsys) -> None:
    assert cli.main(["demo", "--tokens", "64", "--block-size", "16", "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert "over 'local'" in out and "64 tokens = 4 blocks" in out
    assert "bytes exact, 5/5 notifications delivered after the data" in out
    assert "WRONG" not in out


def test_demo_rejects_an_unknown_subcommand() -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["dance"])
    assert caught.value.code == 2
