# What 6.1 accepts and dmsim deliberately refuses: a table mapping its own device
# (refused since 6.2, commit 077a4033541f "block: don't allow a disk link holder to
# itself"; blktests dm/001 needs >= 6.2), a cycle through two devices (I/O on either
# would recurse for ever), and the names "." and ".." (no file on a mount can have them).
# Kept, recorded, in KNOWN_FAILING: the diff is the whole of the difference.
echo "== self"
dmsetup create z --table "0 8 zero"
dmsetup reload z --table "0 8 linear $(dev z) 0"; echo "rc=$?"
dmsetup table z
dmsetup info -c -o name,tables_loaded z
echo "== cycle"
dmsetup create a --table "0 8 zero"
dmsetup create b --table "0 8 linear $(dev a) 0"
dmsetup reload a --table "0 8 linear $(dev b) 0"; echo "rc=$?"
dmsetup info -c -o name,tables_loaded a
dmsetup clear a
klog
echo "== names"
dmsetup create "." --table "0 8 zero"; echo "rc=$?"
dmsetup create ".." --table "0 8 zero"; echo "rc=$?"
dmsetup ls | sort
dmsetup remove_all
dmsetup ls
