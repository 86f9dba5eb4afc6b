"""Word data for CHAIR (``attnkit.eval.chair``): COCO synonyms, two-word phrases, singularizer lists.

The synonym table is the one of Rohrbach et al. 2018 (``data/synonyms.txt`` of their release,
also inlined in the two widely used ports): 80 COCO categories, each with the surface forms
that count as a mention of it. Three entries of that list never match in the published
scripts and are repaired here: "motor bike" and "cheesecake" carry a stray leading space
there, and "iPhone" is capitalised while captions are lower-cased. Duplicates are dropped.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- COCO objects

#: category name -> further surface forms (comma-separated); the name itself is one too.
SYNONYMS: dict[str, str] = {
    "person": (
        "girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, "
        "passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, "
        "guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, "
        "skateboarder, foreigner, caller, offender, coworker, trespasser, patient, politician, soldier, "
        "grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, "
        "camper, driver, solider, hunter, shopper, villager"
    ),
    "bicycle": "bike, unicycle, minibike, trike",
    "car": "automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi",
    "motorcycle": "scooter, motor bike, motor cycle, motorbike, moped",
    "airplane": "jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane",
    "bus": "minibus, trolley",
    "train": "locomotive, tramway, caboose",
    "truck": "pickup, lorry, hauler, firetruck",
    "boat": (
        "ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, "
        "catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, "
        "schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, "
        "battleship, steamship"
    ),
    "traffic light": "street light, traffic signal, stop light, streetlight, stoplight",
    "fire hydrant": "hydrant",
    "stop sign": "",
    "parking meter": "",
    "bench": "pew",
    "bird": (
        "ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, "
        "hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, "
        "woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, "
        "flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, "
        "raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, "
        "condor, macaw, peafowl, cockatoo, songbird"
    ),
    "cat": "kitten, feline, tabby",
    "dog": (
        "puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, "
        "terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, "
        "weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky"
    ),
    "horse": (
        "colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, "
        "bronco"
    ),
    "sheep": "lamb, ram, goat, ewe",
    "cow": "cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison",
    "elephant": "",
    "bear": "panda",
    "zebra": "",
    "giraffe": "",
    "backpack": "knapsack",
    "umbrella": "",
    "handbag": "wallet, purse, briefcase",
    "tie": "bow, bow tie",
    "suitcase": "suit case, luggage",
    "frisbee": "",
    "skis": "ski",
    "snowboard": "",
    "sports ball": "ball",
    "kite": "",
    "baseball bat": "",
    "baseball glove": "",
    "skateboard": "",
    "surfboard": "longboard, skimboard, shortboard, wakeboard",
    "tennis racket": "racket",
    "bottle": "",
    "wine glass": "",
    "cup": "",
    "fork": "",
    "knife": "pocketknife, knive",
    "spoon": "",
    "bowl": "container",
    "banana": "",
    "apple": "",
    "sandwich": "burger, sub, cheeseburger, hamburger",
    "orange": "",
    "broccoli": "",
    "carrot": "",
    "hot dog": "",
    "pizza": "",
    "donut": "doughnut, bagel",
    "cake": "cheesecake, cupcake, shortcake, coffeecake, pancake",
    "chair": "seat, stool",
    "couch": "sofa, recliner, futon, loveseat, settee, chesterfield",
    "potted plant": "houseplant",
    "bed": "",
    "dining table": "table, desk",
    "toilet": "urinal, commode, lavatory, potty",
    "tv": "monitor, televison, television",
    "laptop": "computer, notebook, netbook, lenovo, macbook, laptop computer",
    "mouse": "",
    "remote": "",
    "keyboard": "",
    "cell phone": "mobile phone, phone, cellphone, telephone, phon, smartphone, iphone",
    "microwave": "",
    "oven": "stovetop, stove, stove top oven",
    "toaster": "",
    "sink": "",
    "refrigerator": "fridge, freezer",
    "book": "",
    "clock": "",
    "vase": "",
    "scissors": "",
    "teddy bear": "teddybear",
    "hair drier": "hairdryer",
    "toothbrush": "",
}

#: surface form (lower case, one or two words) -> COCO category
SURFACE_TO_CATEGORY: dict[str, str] = {
    form: category
    for category, more in SYNONYMS.items()
    for form in (category, *(f.strip() for f in more.split(",") if f.strip()))
}

#: Two words read as one unit. Most are COCO surface forms; "home plate" and "train track" are
#: not, so they only stop "plate" / "train" from counting. (The original list also has the
#: three-word "stove top oven", which a two-word matcher never reaches, so it is left out.)
TWO_WORD_PHRASES: tuple[str, ...] = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "home plate", "train track",
)

#: "baby X" / "adult X" is the animal X, not a person ("baby" and "adult" are person words).
#: "animal" and "cub" are not COCO words: "baby animal" and "adult cub" count as nothing.
AGE_QUALIFIERS: tuple[str, ...] = ("baby", "adult")
ANIMAL_WORDS: tuple[str, ...] = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)
#: "passenger X" is the vehicle X, not a person.
PASSENGER_VEHICLES: tuple[str, ...] = ("jet", "train")


def _phrases() -> dict[str, str]:
    out = {p: p for p in TWO_WORD_PHRASES}
    out.update({f"{q} {a}": a for q in AGE_QUALIFIERS for a in ANIMAL_WORDS})
    out.update({f"passenger {v}": v for v in PASSENGER_VEHICLES})
    out["bow tie"] = "tie"  # a bow tie is the COCO "tie"
    out["toilet seat"] = "toilet"  # the seat of a toilet is not a chair
    return out


#: two singularized words -> the single word they stand for (looked up in SURFACE_TO_CATEGORY)
PHRASE_TO_WORD: dict[str, str] = _phrases()

# ----------------------------------------------------------------------------- singularizer lists


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: irregular plurals, matched on the whole word
IRREGULAR_PLURALS: dict[str, str] = {
    "people": "person", "children": "child", "mice": "mouse", "lice": "louse", "geese": "goose",
    "teeth": "tooth", "feet": "foot", "oxen": "ox", "dice": "die", "brethren": "brother",
    "busses": "bus", "minibusses": "minibus", "quizzes": "quiz", "lives": "life", "leaves": "leaf",
    "elves": "elf", "selves": "self", "crises": "crisis", "theses": "thesis", "analyses": "analysis",
    "diagnoses": "diagnosis", "oases": "oasis", "parentheses": "parenthesis", "hypotheses": "hypothesis",
    "cacti": "cactus", "fungi": "fungus", "octopi": "octopus", "alumni": "alumnus", "radii": "radius",
    "nuclei": "nucleus", "stimuli": "stimulus", "syllabi": "syllabus", "indices": "index",
    "matrices": "matrix", "appendices": "appendix", "vertices": "vertex", "criteria": "criterion",
    "phenomena": "phenomenon", "zebus": "zebu", "menus": "menu", "gurus": "guru", "emus": "emu",
    "gnus": "gnu", "tutus": "tutu", "haikus": "haiku", "tofus": "tofu",
}

#: irregular plural endings, matched on the end of the word (policewomen, grandchildren, ...)
IRREGULAR_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("children", "child"), ("people", "person"), ("knives", "knife"), ("wives", "wife"),
    ("wolves", "wolf"), ("shelves", "shelf"), ("thieves", "thief"), ("calves", "calf"),
    ("halves", "half"), ("loaves", "loaf"), ("scarves", "scarf"), ("hooves", "hoof"),
    ("dwarves", "dwarf"), ("wharves", "wharf"), ("sheaves", "sheaf"),
)

#: singular words ending in "men" that the men -> man rule must leave alone
MEN_SINGULARS: frozenset[str] = _words(
    "omen amen abdomen specimen stamen regimen hymen semen acumen cyclamen bitumen lumen albumen "
    "dolmen foramen germen yemen ramen carmen examen gravamen rumen tegmen"
)

#: words ending in s that are not plurals: function words, plural-only and uninflected nouns,
#: and singular nouns in -s (bus, gas, lens, ...; their plurals take -es: buses -> bus)
UNCHANGED: frozenset[str] = _words(
    # function words
    "is as us has was his its this thus yes does goes hers ours yours theirs whereas always "
    "perhaps sometimes besides towards afterwards upwards downwards backwards forwards onwards "
    "nowadays sideways overseas lots "
    # plural-only or same in both numbers
    "series species means news headquarters scissors pants jeans shorts trousers pliers tongs "
    "tweezers binoculars clothes pajamas pyjamas leggings overalls tights mathematics physics "
    "politics economics athletics gymnastics aerobics ethics billiards darts measles mumps "
    "diabetes rabies herpes scabies premises outskirts surroundings belongings congratulations "
    "thanks savings barracks gallows crossroads corps innings bellows shambles kudos odds suds "
    "dregs remains "
    # singular nouns ending in s
    "gas canvas atlas alias bias christmas texas vegas paris iris tennis axis pelvis trellis "
    "chassis debris mantis ibis penis marquis hubris cannabis lens chaos cosmos pathos ethos "
    "thermos asbestos rhinoceros pancreas "
    "bus minibus airbus omnibus trolleybus autobus microbus motorbus schoolbus virus bonus campus "
    "circus octopus walrus cactus hippopotamus platypus fungus chorus census citrus hibiscus "
    "asparagus thesaurus abacus apparatus syllabus rebus crocus discus focus lotus nexus status "
    "stimulus uterus fetus sinus genus plus eucalyptus papyrus cumulus nimbus hummus humus "
    "terminus surplus ficus caucus mucus onus exodus impetus radius nucleus alumnus"
)

#: singulars in -ie whose plural -ies must not become -y (ties, collies, magpies, doggies, ...)
IE_SINGULARS: frozenset[str] = _words(
    "tie necktie bowtie pie lie die collie magpie doggie cookie movie brownie zombie selfie hippie "
    "rookie goalie smoothie birdie beanie hoodie genie prairie calorie pixie pinkie veggie cutie "
    "sweetie auntie bootie newbie techie foodie roadie junkie bookie yuppie groupie lingerie "
    "menagerie boogie bogie coolie lassie laddie nightie indie kiddie sortie reverie budgie"
)

#: singulars in -oe (plural -oes loses only the s); other -oes plurals lose -es (potatoes)
OE_SINGULARS: frozenset[str] = _words(
    "shoe toe canoe hoe oboe foe floe sloe aloe roe doe woe throe tiptoe mistletoe felloe"
)

#: singulars in -che (plural -ches loses only the s); other -ches plurals lose -es (benches)
CHE_SINGULARS: frozenset[str] = _words(
    "niche cache moustache mustache ache headache toothache stomachache backache earache avalanche "
    "cliche quiche psyche brioche creche douche fiche microfiche tranche gouache panache attache "
    "cloche pastiche"
)
