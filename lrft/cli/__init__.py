"""The ``lrft`` command line: :mod:`.main` dispatches to one module per command (:mod:`.train`,
:mod:`.eval`, :mod:`.merge`, :mod:`.export`, :mod:`.generate` for generate and chat,
:mod:`.memory`, :mod:`.plot`), with the ``--help`` pages (:mod:`.help`), what merge and export
share (:mod:`.jobs`) and quiet-by-default logging (:mod:`.quiet`).

Nothing here imports torch at module level: ``lrft --help`` and config errors answer in well under
a second. Library code never imports this package.
"""
