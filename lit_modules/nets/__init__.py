"""The network zoo: every model file is imported here so its builders register by name.

``create_net("resnet20", num_classes=10, in_channels=3, image_size=32)``; ``available_nets()`` lists
the names. Every network is a :class:`ClassifierNet` (``forward_features`` + ``get_classifier``).
Generators (z -> images) have their own names: ``create_generator("dafl", latent_dim=1000, out_channels=1,
image_size=32)``.
"""

from lit_modules.nets import alexnet, convnet, lenet, madry, resnet_cifar, wong, wrn  # noqa: F401  (registration)
from lit_modules.nets.base import ClassifierNet, classifier_layer, features_and_logits
from lit_modules.nets.gan import available_discriminators, create_discriminator
from lit_modules.nets.generator import DAFLGenerator, LatentEncoder, available_generators, create_generator
from lit_modules.nets.normalization import InputNormalization
from lit_modules.nets.registry import NetSpec, available_nets, create_net, import_class, net_name, register_net

__all__ = [
    "ClassifierNet",
    "InputNormalization",
    "NetSpec",
    "classifier_layer",
    "features_and_logits",
    "import_class",
    "net_name",
    "DAFLGenerator",
    "LatentEncoder",
    "available_discriminators",
    "available_generators",
    "create_discriminator",
    "available_nets",
    "create_generator",
    "create_net",
    "register_net",
]
