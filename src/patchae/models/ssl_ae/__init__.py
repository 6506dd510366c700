"""SSL-AE (Bauer, Nakajima, Müller): the network and its Lightning wrapper."""

from patchae.models.ssl_ae.module import SSLAEModule
from patchae.models.ssl_ae.network import SSLAutoencoder

__all__ = ["SSLAEModule", "SSLAutoencoder"]
