"""The spec's checkpoint settings reach the library through SPOTRUN_CHECKPOINT_{KEEP,INTERVAL}."""

from spotrun.checkpoint import Checkpointer
from spotrun.control.controller import checkpoint_env
from spotrun.spec import parse_spec_text


def test_spec_settings_become_checkpointer_defaults(monkeypatch, tmp_path):
    spec = parse_spec_text("name: x\nrun: t\ncheckpoint: {interval: 10m, keep: 5}\n", "job.yaml", base_dir=tmp_path)
    env = checkpoint_env(spec)
    assert env == {"SPOTRUN_CHECKPOINT_KEEP": "5", "SPOTRUN_CHECKPOINT_INTERVAL": "600"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ck = Checkpointer(root=tmp_path, handle_signals=False)
    assert (ck.keep, ck.every_seconds, ck.every_steps) == (5, 600.0, None)
    explicit = Checkpointer(root=tmp_path, keep=2, every_steps=10, handle_signals=False)
    assert (explicit.keep, explicit.every_seconds, explicit.every_steps) == (2, None, 10)


def test_without_the_environment_the_builtin_defaults_hold(monkeypatch, tmp_path):
    monkeypatch.delenv("SPOTRUN_CHECKPOINT_KEEP", raising=False)
    monkeypatch.delenv("SPOTRUN_CHECKPOINT_INTERVAL", raising=False)
    ck = Checkpointer(root=tmp_path, handle_signals=False)
    assert (ck.keep, ck.every_seconds) == (3, None)
