#!/bin/sh
# `make data`: make Fashion-MNIST available to dataset=fashion_mnist without a download at run time.
# Where apt-get exists this installs the Debian package dataset-fashion-mnist, whose idx files
# (/usr/share/datasets/fashion-mnist) the loader finds by itself; elsewhere it says how to get them.
set -eu

FOLDER=/usr/share/datasets/fashion-mnist

if [ -f "$FOLDER/train-images-idx3-ubyte.gz" ] && [ -f "$FOLDER/t10k-labels-idx1-ubyte.gz" ]; then
    echo "Fashion-MNIST: already installed in $FOLDER"
    exit 0
fi

if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=""
    elif command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: installing dataset-fashion-mnist needs root, and sudo is not available" >&2
        echo "fix: run 'apt-get install -y dataset-fashion-mnist' as root, or use dataset.download=true" >&2
        exit 2
    fi
    $SUDO apt-get update
    $SUDO apt-get install -y dataset-fashion-mnist
    echo "Fashion-MNIST: installed in $FOLDER"
    exit 0
fi

echo "error: apt-get is not available, so the Debian package dataset-fashion-mnist cannot be installed here" >&2
echo "fix: add dataset.download=true to the first run (torchvision downloads the four idx files into" >&2
echo "     <paths.data_dir>/FashionMNIST/raw), or copy {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] there by hand" >&2
exit 2
