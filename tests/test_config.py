"""miarobust/config.py and values.py: eps, norm and gate mode validated once where a RunConfig is made, and
config.json read back typed, the request and its resolution side by side."""

from __future__ import annotations

import pytest

from miarobust.config import Resolved, RunConfig, RunRecord
from miarobust.errors import UserError
from miarobust.values import Eps, GateMode


@pytest.mark.parametrize("fields, match", [({"norm": "L3"}, "unknown norm"), ({"gate_mode": "random"}, "gate mode"),
                                           ({"eps": 0.0}, "finite number"), ({"eps": float("nan")}, "finite number"),
                                           ({"checks": "maybe"}, "checks mode"), ({"attacks": ()}, "no attack")])
def test_a_run_config_refuses_bad_values(fields, match):
    with pytest.raises(UserError, match=match):
        RunConfig(**fields)


def test_values_parse_once():
    assert Eps.parse("8/255") == Eps(8 / 255, "8/255") and Eps.parse(Eps.parse("1/255")).text == "1/255"
    assert Eps.parse(0.5).value == 0.5 and str(Eps.parse(" 2/255 ")) == "2/255"
    for bad in ("abc", "-1", True, None, "1/0"):
        with pytest.raises(UserError, match="8/255"):
            Eps.parse(bad)
    cfg = RunConfig.with_eps("4/255", gate_mode=GateMode.STOCHASTIC)
    assert cfg.gate_mode == "stochastic" and isinstance(cfg.gate_mode, str) and cfg.eps_text == "4/255"
    assert cfg.folder_name() == RunConfig.with_eps("4/255", gate_mode="stochastic").folder_name()
    assert cfg.threat.norm == "Linf" and cfg.threat.eps == pytest.approx(4 / 255)
    assert RunConfig(eps=0.1).eps_text == "0.1"  # eps given alone: its text follows
    with pytest.raises(UserError, match="disagree"):
        RunConfig(eps=0.1, eps_text="4/255")


def test_config_json_round_trip():
    asked = RunConfig.with_eps("8/255", model="mia_vit_fmnist", attacks=("adaptive",), gate_mode=None, n=10)
    resolved = Resolved(gate_mode="deterministic", checkpoint="/x/mia_vit_fmnist_lat076.safetensors",
                        weights_sha256="ab" * 32, attacks=("autoattack", "autoattack-st", "bpda-pgd"), eot=None,
                        gate_grad={"autoattack": "none", "autoattack-st": "straight-through", "bpda-pgd": "straight-through"})
    text = RunRecord(asked, resolved).to_json({"torch": "x"})
    assert text["gate_mode"] == "deterministic" and text["requested"] == {"gate_mode": None, "checkpoint": None}
    back = RunRecord.read(text)
    assert back.requested == asked and back.resolved == resolved
    assert back.requested.folder_name() == asked.folder_name()


def test_square_query_budget_is_part_of_the_identity():
    default = RunConfig.with_eps("4/255", attacks=("square",))
    assert default.attack_config().queries == 5000 and "queries" not in default.identity()  # old folders keep names
    more = RunConfig.with_eps("4/255", attacks=("square",), queries=20_000)
    assert more.attack_config().queries == 20_000 and more.folder_name() != default.folder_name()
    for bad in (0, -5, 2.5, True):
        with pytest.raises(UserError, match="queries .* whole number"):
            RunConfig(queries=bad)
