"""CARD-Deck: an ensemble of compact robust image classifiers (CARDs) in one checkpoint folder.

"A Winning Hand" (Diffenderfer et al., NeurIPS 2021) ensembles several sparse networks, each trained with
its own data augmentation. This file is the deck's modeling code; it travels with the checkpoint, so

    AutoModelForImageClassification.from_pretrained(deck, trust_remote_code=True)

returns ``CardDeckForImageClassification`` without hf_prune installed. The folder holds every member's
weights (``members.<i>.*``), the members' shared architecture (``member_config``, one transformers config
as a dict), each member's augmentation domain (``member_domains``) and the domains' reference spectra.

The forward pass returns the ensemble's logits: ``log(mean_k softmax(z_k))`` over the members it uses, so
``softmax(logits)`` is the average of the members' probabilities (and argmax, cross-entropy and
``pipeline("image-classification")`` see the ensemble). Which members, per batch, is the gating:

- ``uniform``: every member (RobustBench's CARD-Deck: the average of six members' softmax);
- ``spectral``: the members of one augmentation domain, the domain whose reference spectrum is nearest to
  the batch's. With ``A(x) = log(1 + |FFT2(x)|)`` per channel of the pixel values (2-D DFT over height and
  width), the batch spectrum ``S_B = mean_{x in B} A(x)`` and a domain's ``S_d = mean A(x)`` over its
  training images after that domain's augmentation, the deck picks ``argmin_d mean_{c,u,v}
  (S_B - S_d)^2``. The log compresses the amplitude range (the low-frequency terms dominate otherwise);
  noise raises and blur lowers the high-frequency amplitudes, so the squared log distance follows the
  corruptions augmentation families answer to. The paper names spectral similarity but publishes no
  formula; this one is ours.

Imports only torch and transformers.
"""

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from .patch_classes import PREFIX, register_auto_classes

GATING_MODES = ("uniform", "spectral")


def amplitude_spectrum(pixel_values: torch.Tensor) -> torch.Tensor:
    """``mean_x log(1 + |FFT2(x)|)`` over a batch ``[N, C, H, W]``: the ``[C, H, W]`` spectrum gating uses."""
    return torch.log1p(torch.fft.fft2(pixel_values.float()).abs()).mean(dim=0)


class CardDeckConfig(PretrainedConfig):
    """The deck: the members' shared config, each member's augmentation domain, the gating mode."""

    model_type = PREFIX + "card_deck"

    def __init__(
        self,
        member_config=None,
        member_domains=None,
        gating="uniform",
        domains=None,
        spectrum_shape=None,
        **kwargs,
    ):
        self.member_config = dict(member_config or {})
        self.member_domains = list(member_domains or [])
        self.gating = gating
        # Domains in the order of the rows of the ``domain_spectra`` buffer.
        self.domains = list(domains or dict.fromkeys(self.member_domains))
        self.spectrum_shape = list(spectrum_shape) if spectrum_shape else None
        if gating not in GATING_MODES:
            raise ValueError(f"gating: must be one of {', '.join(GATING_MODES)}, got {gating!r}")
        unknown = sorted(set(self.member_domains) - set(self.domains))
        if unknown:
            raise ValueError(f"member_domains: {unknown[0]!r} is not in domains {self.domains}")
        if gating == "spectral" and not self.spectrum_shape:
            raise ValueError(
                "gating: spectral needs the domains' reference spectra (spectrum_shape is unset)"
            )
        super().__init__(**kwargs)

    @property
    def num_members(self) -> int:
        return len(self.member_domains)

    def member_transformers_config(self) -> PretrainedConfig:
        settings = dict(self.member_config)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


class CardDeckForImageClassification(PreTrainedModel):
    """The members side by side; ``forward(pixel_values)`` returns the gated ensemble's logits."""

    config_class = CardDeckConfig
    main_input_name = "pixel_values"
    base_model_prefix = "card_deck"
    input_modalities = ("image",)

    def __init__(self, config: CardDeckConfig):
        super().__init__(config)
        member_config = config.member_transformers_config()
        self.members = nn.ModuleList(
            [AutoModelForImageClassification.from_config(member_config) for _ in range(config.num_members)]
        )
        shape = config.spectrum_shape or [0, 0, 0]
        self.register_buffer("domain_spectra", torch.zeros(len(config.domains), *shape))
        #: The domain the last spectral forward picked (None for uniform gating).
        self.last_domain = None
        self.post_init()

    def _init_weights(self, module):
        # The members initialise themselves in from_config; a loaded deck overwrites every weight anyway.
        pass

    def member_indices(self, pixel_values: torch.Tensor) -> list:
        """The members this batch goes to (every member, or those of the nearest domain)."""
        if self.config.gating == "uniform":
            self.last_domain = None
            return list(range(self.config.num_members))
        spectrum = amplitude_spectrum(pixel_values).to(self.domain_spectra.dtype)
        if tuple(spectrum.shape) != tuple(self.domain_spectra.shape[1:]):
            raise ValueError(
                f"spectral gating: the batch's spectrum is {tuple(spectrum.shape)} (channels, height, width), "
                f"the deck's reference spectra are {tuple(self.domain_spectra.shape[1:])}"
            )
        distances = ((self.domain_spectra - spectrum) ** 2).flatten(1).mean(dim=1)
        self.last_domain = self.config.domains[int(torch.argmin(distances))]
        return [i for i, d in enumerate(self.config.member_domains) if d == self.last_domain]

    def forward(self, pixel_values=None, labels=None, return_dict=None, **kwargs):
        chosen = self.member_indices(pixel_values)
        probabilities = torch.stack(
            [self.members[i](pixel_values=pixel_values).logits.float().softmax(dim=-1) for i in chosen]
        ).mean(dim=0)
        logits = probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)


register_auto_classes(CardDeckConfig, CardDeckForImageClassification, "AutoModelForImageClassification")
