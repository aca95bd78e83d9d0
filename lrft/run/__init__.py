"""The run folder and what lrft writes to disk: the folder's rules (:mod:`.folder`: never silently
reused, resumed from its own config), the final trainable state (:mod:`.final`), the output
folders of merge/export (:mod:`.output`), atomic publishing (:mod:`.atomic`), which process
writes where (:mod:`.topology`) and loss plots (:mod:`.plots`).
"""
