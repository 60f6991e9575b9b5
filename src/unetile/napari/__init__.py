"""unetile in napari: segment, correct, fine-tune, train and evaluate without code.

``pip install "unetile[napari]"`` registers the plugin (``napari.yaml``); its
widgets are under *Plugins > unetile* and its sample under *File > Open
Sample > unetile*. The logic (:mod:`._logic`, :mod:`._session`) needs no Qt;
:mod:`._widgets` is the thin Qt side.
"""
