"""The book: staging and building it (:mod:`~adcore.book.build`), and the code of its computed chapters.

* :mod:`~adcore.book.build`: run the grid, execute the chapters over the runs' results, build the HTML;
* :mod:`~adcore.book.budget`: the "Results and training budget" chapter;
* :mod:`~adcore.book.shortcuts`: the "Shortcuts" chapter (each paper's test-set shortcut beside the honest number).
"""
