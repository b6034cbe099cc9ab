"""Optional integrations, each an extra imported only when its module is: ``keras`` (``[keras]``), ``lightning``
(``[lightning]``) and ``transformers`` (``[transformers]``). Importing this package imports none of them."""
