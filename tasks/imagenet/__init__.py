"""ImageNet-1K classification, or any ImageFolder (the paper's ImageNet table).

Modules: `layout` (the ImageFolder layout and its checks), `data` (`ImageFolderDataModule`, timm's transforms and
Mixup), `module` (`ImageNetModule`, timm's optimiser and schedule), `complexity` (parameters and MACs), `prepare`
(`make data-imagenet`), `digits` (a small real ImageFolder from scikit-learn's digits). Nothing is imported here, so the command-line tools load only what they use.
"""
