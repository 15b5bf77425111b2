"""Packed sequences: documents sharing a row never see each other and get the logits they get alone."""

import pytest
import torch

from gazelle.models.config import from_hf_config
from gazelle.models.decoder import Decoder
from tests.tiny import tiny_hf_model


def gazelle_model(family: str) -> Decoder:
    hf = tiny_hf_model(family)
    model = Decoder(from_hf_config(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "phi3"])
def test_two_packed_documents_equal_each_alone(family):
    model = gazelle_model(family)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, 256, (1, 11), generator=g), torch.randint(3, 256, (1, 8), generator=g)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(11), torch.arange(8)])[None]
    with torch.no_grad():
        together = model.logits(model(packed, position_ids=position_ids))
        alone = [model.logits(model(doc)) for doc in (first, second)]
    torch.testing.assert_close(together[:, :11], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(together[:, 11:], alone[1], atol=1e-5, rtol=0)
    # The second document really is shielded: without the resets it would read the first one.
    with torch.no_grad():
        unpacked = model.logits(model(packed))
    assert (unpacked[:, 11:] - alone[1]).abs().max() > 1e-2
