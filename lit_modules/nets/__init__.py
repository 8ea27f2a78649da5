"""The network zoo: every model file is imported here so its builders register by name.

``create_net("resnet20", num_classes=10, in_channels=3, image_size=32)``; ``available_nets()`` lists
the names. Every network is a :class:`ClassifierNet` (``forward_features`` + ``get_classifier``).
"""

from lit_modules.nets import alexnet, convnet, lenet, resnet_cifar, wrn  # noqa: F401  (registration)
from lit_modules.nets.base import ClassifierNet
from lit_modules.nets.registry import available_nets, create_net, register_net

__all__ = ["ClassifierNet", "available_nets", "create_net", "register_net"]
