//! A table of requests in flight whose index is the tag an op carries through the kernel and
//! back: the io_uring engine keeps its ops in one, an NBD connection or a vhost-user queue its
//! requests.

/// Requests in flight, by slot. A freed slot is reused before the table grows, so tags stay
/// small and the table never outgrows the most requests that were in flight at once.
#[derive(Debug)]
pub struct Slots<T> {
    slots: Vec<Option<T>>,
    /// Slots that hold nothing, reused last-freed first.
    free: Vec<usize>,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Slots<T> {
    /// Stores `s` and returns its slot (the op's tag).
    pub fn insert(&mut self, s: T) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i
            }
            None => {
                self.slots.push(Some(s));
                self.slots.len() - 1
            }
        }
    }

    /// Takes the request out of `slot` and frees the slot; `None` for a slot that holds none.
    pub fn take(&mut self, slot: usize) -> Option<T> {
        let s = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        Some(s)
    }

    /// The request in `slot`, if it holds one.
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// No request in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_is_reused_and_a_free_slot_holds_nothing() {
        let mut s = Slots::default();
        assert_eq!((s.insert('a'), s.insert('b'), s.insert('c')), (0, 1, 2));
        assert_eq!(s.take(1), Some('b'));
        assert_eq!(s.take(1), None, "taken twice");
        assert_eq!(s.take(7), None, "never used");
        assert_eq!(s.len(), 2);
        *s.get_mut(2).expect("c is in slot 2") = 'C';
        assert_eq!(s.get_mut(1), None);
        assert_eq!(s.insert('d'), 1);
        assert_eq!(s.insert('e'), 3);
        assert_eq!(s.len(), 4);
        assert_eq!((s.take(0), s.take(1), s.take(2), s.take(3)), (Some('a'), Some('d'), Some('C'), Some('e')));
        assert_eq!(s.len(), 0);
    }
}
