"""`mgrpo import-gguf`: the SmolLM2 GGUF becomes an HF directory with the same logits."""

import pytest
import torch

from megatron_mgrpo.cli import main
from megatron_mgrpo.config import ConfigError
from megatron_mgrpo.models.gguf_import import find_smollm2_gguf, import_gguf, load_gguf


@pytest.mark.slow
def test_imported_directory_gives_the_gguf_models_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    assert main(["import-gguf", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and "quantization_config" not in model.config.to_dict()
    reference, reference_tokenizer = load_gguf(find_smollm2_gguf())
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == [reference_tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert tokenizer.eos_token == "<|im_end|>"


def test_refuses_to_overwrite_and_names_missing_files(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not empty"):
        import_gguf(tmp_path / "taken", gguf=tmp_path / "taken" / "config.json")
    with pytest.raises(ConfigError, match="is not a file"):
        import_gguf(tmp_path / "new", gguf=tmp_path / "missing.gguf")
