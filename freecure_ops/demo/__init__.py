"""``freecure demo``: a local web page on a diffusers pipeline. :mod:`.session` holds the page's state (the
pipelines, the foundation of the last pass 1, the images of the omegas tried) and runs the passes, without
Gradio; :mod:`.page` is the Gradio page over it (imported only by ``freecure demo``: Gradio is an optional
extra, ``pip install -e ".[demo]"``)."""
