"""CPO: settings reach TRL, the trainer trains the replies only, the loss is the one asked for."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from posttrain.data.builtin import preference_rows
from posttrain.models import ModelSource
from posttrain.stages.common import StageContext
from posttrain.stages.cpo import CPOStage

MICRO = ModelSource(name="builtin:micro-llama")


def cpo(**settings):
    return CPOStage(method="cpo", data="d", learning_rate=1e-3, max_steps=1, batch_size=4, max_length=128,
                    **settings)


def test_settings_a_loss_ignores_are_refused():
    with pytest.raises(ValidationError, match="simpo_gamma is read only by loss_type simpo"):
        cpo(simpo_gamma=1.0)
    with pytest.raises(ValidationError, match="label_smoothing is read only by loss_type sigmoid"):
        cpo(loss_type="hinge", label_smoothing=0.1)
    cpo(loss_type="simpo", simpo_gamma=1.0)


def test_pairs_tokenized_with_replies_trained_and_settings_passed(tmp_path):
    """Known answer: in each tokenized pair the trained tokens (labels != -100) are exactly
    the chosen / rejected reply as the template ends it, plus the EOS token TRL's CPO (like
    its ORPO) appends to every completion; the prompt is masked."""
    from posttrain.stages.cpo import build_trainer

    pairs = preference_rows("train", 8)
    spec = cpo(loss_type="simpo", simpo_gamma=0.7, cpo_alpha=0.3, beta=2.0)
    trainer, tokenizer = build_trainer(StageContext(name="cpo", spec=spec, seed=0, start=MICRO, out_dir=tmp_path,
                                                    examples=pairs))
    assert (trainer.loss_type, trainer.simpo_gamma, trainer.cpo_alpha, trainer.beta) == ("simpo", 0.7, 0.3, 2.0)
    for pair, row in zip(pairs, trainer.train_dataset):
        for side in ("chosen", "rejected"):
            trained = [t for t, label in zip(row[f"{side}_input_ids"], row[f"{side}_labels"]) if label != -100]
            assert tokenizer.decode(trained) == pair[side][0]["content"] + "<|im_end|>\n" + tokenizer.eos_token


def test_simpo_loss_is_the_length_normalised_margin(tmp_path):
    """Known answer: with cpo_alpha 0 the loss is -log sigmoid(beta * (mean logp chosen -
    mean logp rejected) - gamma), from log-probs computed here independently."""
    from posttrain.stages.cpo import build_trainer

    spec = cpo(loss_type="simpo", simpo_gamma=0.5, cpo_alpha=0.0, beta=2.0)
    trainer, _ = build_trainer(StageContext(name="cpo", spec=spec, seed=0, start=MICRO, out_dir=tmp_path,
                                            examples=preference_rows("train", 4)))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model.eval()

    def mean_logp(side):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        with torch.no_grad():
            logits = model(ids, attention_mask=batch[f"{side}_attention_mask"]).logits[:, :-1].float()
        target, mask = labels[:, 1:], labels[:, 1:] != -100
        logp = logits.log_softmax(-1).gather(2, target.clamp(min=0)[..., None])[..., 0]
        return (logp * mask).sum(-1) / mask.sum(-1)

    expected = -F.logsigmoid(2.0 * (mean_logp("chosen") - mean_logp("rejected")) - 0.5).mean()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_every_accepted_loss_builds_a_trainer_and_a_finite_loss(tmp_path, loss_type):
    from posttrain.stages.cpo import build_trainer

    trainer, _ = build_trainer(StageContext(name="cpo", spec=cpo(loss_type=loss_type), seed=0, start=MICRO,
                                            out_dir=tmp_path, examples=preference_rows("train", 4)))
    assert trainer.loss_type == loss_type
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
