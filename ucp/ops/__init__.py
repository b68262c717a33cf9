"""What the ``ucp`` commands do, as library calls: ``convert`` (any source -> universal),
``reshard`` (-> any engine's layout), ``export`` (-> Hugging Face safetensors), ``inspect`` /
``verify`` / ``diff`` (reading any checkpoint), with the destination checks (``_dest``) and the
build-beside-then-swap of a destination (``_beside``) they share."""
