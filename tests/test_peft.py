"""Issue 25 item 3: transformers' PEFT image-classification guide with NEPA: LoRA on `q_proj`/`v_proj`, a few Trainer
steps, save, reload, merge, pipeline."""

import pytest
import torch
from PIL import Image
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import Trainer, TrainingArguments, pipeline

from nepa_hf import NepaConfig, NepaForImageClassification, NepaForPreTraining, NepaImageProcessorPil
from nepa_hf.data.classification import collate_image_batch, with_image_transform
from nepa_hf.data.images import load_fashion_mnist, load_image_dataset
from nepa_hf.data.transforms import ImageProcessorTransform

pytestmark = pytest.mark.slow


def test_the_guides_lora_names_fail_and_nepas_names_wrap_the_attention():
    model = NepaForImageClassification(NepaConfig.from_preset("nepa-vit-micro", num_hidden_layers=2, num_labels=3))
    with pytest.raises(ValueError, match="query"):  # the ViT guide's names: PEFT finds no such module
        get_peft_model(model, LoraConfig(target_modules=["query", "value"]))
    wrapped = get_peft_model(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                               "down_proj"]))
    adapted = {name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules() if isinstance(module, BaseTunerLayer)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def test_lora_guide_flow_trains_saves_reloads_merges_and_serves(tmp_path):
    torch.manual_seed(0)
    config = NepaConfig.from_preset("nepa-vit-micro", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                    image_size=28, patch_size=7)
    NepaForPreTraining(config).save_pretrained(tmp_path / "pretrained")
    train = load_image_dataset("bundled", split="train", max_samples=64)
    names = train.features["label"].names
    labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = NepaForImageClassification.from_pretrained(tmp_path / "pretrained", **labels)
    lora_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0, modules_to_save=["classifier", "fc_norm"]))
    trainable = {name for name, parameter in lora_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    processor = NepaImageProcessorPil(size={"height": 28, "width": 28})
    train = with_image_transform(train, ImageProcessorTransform(processor), "image", "label")
    before = {name: p.detach().clone() for name, p in lora_model.named_parameters() if p.requires_grad}
    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=16, learning_rate=5e-3,
                             remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no")
    Trainer(model=lora_model, args=args, train_dataset=train, data_collator=collate_image_batch).train()
    changed = [name for name, p in lora_model.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert any("lora_B" in name for name in changed) and any("classifier" in name for name in changed)
    lora_model.save_pretrained(tmp_path / "adapter")

    pixels = torch.randn(3, 3, 28, 28)
    lora_model.eval()
    with torch.no_grad():
        expected = lora_model(pixel_values=pixels).logits
    base = NepaForImageClassification.from_pretrained(tmp_path / "pretrained", **labels)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, expected, rtol=0, atol=0)
    merged = reloaded.merge_and_unload()
    assert type(merged) is NepaForImageClassification
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(pixels).logits, expected, rtol=1e-5, atol=1e-5)
    classify = pipeline("image-classification", model=merged, image_processor=processor)
    images, _ = load_fashion_mnist("test", source="bundled")
    predictions = classify([Image.fromarray(image) for image in images[:2]], top_k=2)
    assert all(len(p) == 2 and {q["label"] for q in p} <= set(names) for p in predictions)
