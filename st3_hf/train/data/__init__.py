"""Data pipeline: datasets (Fashion-MNIST IDX, image folders, Hugging Face datasets), timm transforms, DataLoaders
(:func:`build_dataloaders`), and a device-resident loader for small datasets."""
from st3_hf.train.data.loaders import DeviceResidentLoader, build_dataloaders, build_device_resident_loaders
from st3_hf.train.data.sources import (FASHION_MNIST_CLASSES, VALID_SOURCES, build_datasets, check_num_classes,
                                       class_names_of, load_fashion_mnist_arrays, load_hf_dataset_dict,
                                       load_uint8_splits, read_idx)
from st3_hf.train.data.transforms import build_eval_transform, build_train_transform, norm_stats, pretrained_cfg_for
