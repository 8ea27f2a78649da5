"""cvlab datamodules: every dataset as uint8 tensors in memory, augmented and normalised per batch."""

from datamodules.base import TensorImageDataModule
from datamodules.class_incremental import ClassIncrementalDataModule, check_splits, even_splits
from datamodules.domain_shift import DomainShiftDataModule
from datamodules.errors import CvlabError, DatasetNotFoundError
from datamodules.longtail import long_tail_counts, long_tail_indices
from datamodules.synthetic import ShapesDataModule, generate_shapes
from datamodules.vision import (
    CIFAR10DataModule,
    CIFAR10LTDataModule,
    CIFAR100DataModule,
    CIFAR100LTDataModule,
    FashionMNISTDataModule,
    FashionMNISTLTDataModule,
    KMNISTDataModule,
    MNISTDataModule,
    MNISTLTDataModule,
    SVHNDataModule,
    USPSDataModule,
)
