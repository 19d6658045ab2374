"""Figures of explanations, one module for the API (``Explanation.plot``, ``bh.compare``, the inline views of
a notebook) and the command line.

* :mod:`~backprop_hooks.plotting.maps`: heat-maps over images and figure grids, on one zero-centred diverging
  scale (``bwr``: red positive, blue negative, white zero; a map without sign in its red half);
* :mod:`~backprop_hooks.plotting.pictures`: the images under the maps, from the formats users have (uint8,
  PIL, 0-255, normalised);
* :mod:`~backprop_hooks.plotting.labels`: titles and colour-bar legends (what a target explains, what the
  colours mean);
* :mod:`~backprop_hooks.plotting.tokens`: token heat-maps as HTML, ANSI terminal lines and PNG figures;
* :mod:`~backprop_hooks.plotting.explanations`: ``Explanation.plot`` and the inline views;
* :mod:`~backprop_hooks.plotting.comparison`: the method × target grid of ``bh.compare``.

matplotlib and numpy (the ``cli`` extra) are imported when a figure is drawn, never by ``import
backprop_hooks``; the HTML and terminal token views need neither. Figures are built without pyplot
(``matplotlib.figure.Figure``): a notebook shows a returned figure once, and nothing is left open in pyplot's
list of figures; to draw into a pyplot window pass ``ax=`` (``fig, ax = plt.subplots(); e.plot(ax=ax)``).
"""
