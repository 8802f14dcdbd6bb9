"""SimPO: its settings become exactly CPO's simpo loss without NLL; it trains and is single-step."""

import pytest
from pydantic import ValidationError

from posttrain.data.builtin import preference_rows
from posttrain.models import ModelSource
from posttrain.stages import METHODS
from posttrain.stages.common import StageContext
from posttrain.stages.simpo import SimPOStage, loss_settings

MICRO = ModelSource(name="builtin:micro-llama")


def test_declared_reference_free_after_sft_on_pairs():
    """Not single-step: with no NLL term SimPO from a base model never learns to answer."""
    method = METHODS["simpo"]
    assert (method.data, method.reference, method.single_step, method.sequences) == ("preference", None, False, 2)


def test_settings_become_cpo_simpo_without_nll(tmp_path):
    """Known answer: the trainer built from a simpo stage runs TRL's simpo loss with these
    beta and gamma and no NLL term (cpo_alpha 0), on pairs with the replies trained."""
    from posttrain.stages.simpo import build_trainer

    spec = SimPOStage(method="simpo", data="d", learning_rate=1e-3, max_steps=1, batch_size=4, max_length=128,
                      beta=2.5, simpo_gamma=1.2)
    assert loss_settings(spec) == {"loss_type": "simpo", "beta": 2.5, "simpo_gamma": 1.2, "cpo_alpha": 0.0,
                                   "label_smoothing": 0.0}
    pairs = preference_rows("train", 4)
    trainer, tokenizer = build_trainer(StageContext(name="simpo", spec=spec, seed=0, start=MICRO, out_dir=tmp_path,
                                                    examples=pairs))
    assert (trainer.loss_type, trainer.beta, trainer.simpo_gamma, trainer.cpo_alpha) == ("simpo", 2.5, 1.2, 0.0)
    row = trainer.train_dataset[0]
    trained = [t for t, label in zip(row["chosen_input_ids"], row["chosen_labels"]) if label != -100]
    assert tokenizer.decode(trained).startswith(pairs[0]["chosen"][0]["content"] + "<|im_end|>")


def test_a_cpo_setting_is_not_a_simpo_setting():
    with pytest.raises(ValidationError, match="cpo_alpha"):
        SimPOStage(method="simpo", data="d", learning_rate=1e-3, cpo_alpha=1.0)
