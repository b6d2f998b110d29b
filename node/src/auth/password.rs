//! Password hashing for users stored in the cluster: bcrypt, as etcd uses, so hashes that etcd
//! clients send (`hashedPassword`) and hashes raftkv makes are interchangeable.

/// bcrypt cost; etcd's default.
pub const COST: u32 = 10;

pub fn hash(password: &str) -> Result<String, String> {
    bcrypt::hash(password, COST).map_err(|e| format!("hashing password: {e}"))
}

/// True if `password` matches `hash`. A malformed hash never matches.
pub fn verify(password: &str, hash: &str) -> bool {
    bcrypt::verify(password, hash).unwrap_or(false)
}

/// Checks that a client-supplied hash is a bcrypt hash.
pub fn is_bcrypt_hash(h: &str) -> bool {
    (h.starts_with("$2a$") || h.starts_with("$2b$") || h.starts_with("$2y$")) && h.len() == 60
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash("s3cret").unwrap();
        assert!(is_bcrypt_hash(&h));
        assert!(verify("s3cret", &h));
        assert!(!verify("wrong", &h));
        assert!(!verify("s3cret", "not-a-hash"));
    }
}
