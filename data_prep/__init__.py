"""Offline conversion of image datasets into the fast loaders' formats.

Run as ``python -m data_prep {ffcv,dali} SRC OUT [options]`` (``--help`` lists them).

- ``ffcv``: an ImageFolder tree or a CIFAR-10 root -> one ``.beton`` named by the settings that made
  it, plus a JSON sidecar (settings, class names, counts, skipped and converted files, time taken).
- ``dali``: an ImageFolder tree -> a DALI file list and class index, and optionally webdataset tar
  shards with the index files ``fn.readers.webdataset`` reads.

Both are idempotent (a finished output made with the same settings from the source as it is now is
skipped; ``--verify`` reads it back all the same), write to a temporary name and rename, and skip
unreadable images and files that are not regular files, listing them in the sidecar (``--strict``
fails instead). Symbolic links in the source are followed; each real folder and file is read once.
Pixels are stored as uint8 RGB and never normalised: the loaders in ``advft.data`` turn them into
float [0, 1] on the device.
"""
