"""``accelshim serve``'s options reach the settings: every one, whatever its name."""
from __future__ import annotations

import dataclasses

from shim.cli import _parser, serve_settings
from shim.config import Settings


def _serve_actions():
    sub = next(a for a in _parser()._actions if a.dest == "command")
    return [a for a in sub.choices["serve"]._actions if a.dest != "help"]


def test_every_serve_option_is_a_setting():
    names = {f.name for f in dataclasses.fields(Settings)}
    assert {a.dest for a in _serve_actions()} <= names


def test_each_flag_overrides_its_setting_and_unset_ones_keep_the_environments(monkeypatch):
    monkeypatch.setenv("ACCELSHIM_THREADS", "7")
    args = _parser().parse_args(["serve", "--no-cuda-graphs", "--no-batching", "--port", "0", "--workers", "3"])
    settings = serve_settings(args)
    assert settings.cuda_graphs is False and settings.batching is False
    assert (settings.port, settings.workers, settings.threads) == (0, 3, 7)
    assert serve_settings(_parser().parse_args(["serve"])).cuda_graphs is True
