"""vk-provider: a virtual-kubelet node agent emulating Alibaba Cloud ECI ImageCache."""

__version__ = "0.1.0"
